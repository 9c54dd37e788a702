"""The early-persistence job's success figure and SUCCESS_REPORT.md (its on_success hook)."""

from workers.persistence_report.report import *  # noqa: F401,F403
