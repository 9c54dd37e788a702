"""The plan's ``sync:`` section: where and how the controller pushes the dashboard over SFTP."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_SYNC_FILES = (
    "PARALLEL_PROGRESS.md",
    "progress*.png",
    "**/success_viz/*.png",
    "**/success_viz/*_REPORT.md",
)


class SyncConfig(BaseModel):
    """Push target and policy. Paths in ``files`` are globs relative to the plan's directory.

    ``target`` is ``user@host:path``, ``host:path`` or ``alias:path`` where alias is a Host in
    ~/.ssh/config. Passwords are never accepted: keys come from the agent, ``key_file`` or
    ~/.ssh/config.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="user@host:path or an ssh-config Host alias with :path")
    port: int | None = Field(default=None, ge=1, le=65535)
    key_file: Path | None = None
    known_hosts: Path | None = None
    accept_unknown_host: bool = False
    interval_s: float = Field(default=10.0, gt=0)
    files: tuple[str, ...] = DEFAULT_SYNC_FILES
    include_checkpoints: bool = False
    connect_timeout_s: float = Field(default=10.0, gt=0)
    op_timeout_s: float = Field(default=30.0, gt=0)
