"""The plan's ``sync:`` section: where and how the controller pushes the dashboard over SFTP.

Example (experiments.yaml)::

    sync:
      target: me@laptop.local:~/gpu-box      # or an ~/.ssh/config Host alias: laptop:~/gpu-box
      interval_s: 10
      # key_file: ~/.ssh/id_ed25519          # default: ssh-agent, ~/.ssh/config, ~/.ssh/id_*
      # files: [PARALLEL_PROGRESS.md, "progress*.png"]   # globs relative to the plan's folder
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.remote.ssh import parse_target

DEFAULT_SYNC_FILES = (
    "**/PARALLEL_PROGRESS.md",
    "**/progress*.png",
    "**/success_viz/*.png",
    "**/success_viz/*_REPORT.md",
    "**/race_report/*.png",
    "**/race_report/RACE_REPORT.md",
)

CHECKPOINT_FILES = ("**/checkpoints/*",)


class SyncConfig(BaseModel):
    """Push target and policy. Paths in ``files`` are globs relative to the plan's directory.

    ``target`` is ``user@host:path``, ``host:path`` or ``alias:path`` where alias is a Host in
    ~/.ssh/config. Passwords are never accepted: keys come from the agent, ``key_file`` or
    ~/.ssh/config. Each file lands at the same relative path under the target directory, and
    so do the images that pushed markdown pages reference (inside the plan's directory).
    Checkpoints (any ``checkpoints/`` folder, ``*.pt``, ``*.ckpt``, ``*.safetensors``) are
    skipped unless ``include_checkpoints`` is true.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="user@host:path or an ssh-config Host alias with :path")
    port: int | None = Field(default=None, ge=1, le=65535)
    key_file: Path | None = None
    known_hosts: Path | None = None
    ssh_config: Path | None = Field(default=None, description="default: ~/.ssh/config")
    accept_unknown_host: bool = Field(
        default=False,
        description="append an unknown host key to known_hosts (logs its fingerprint)",
    )
    interval_s: float = Field(default=10.0, gt=0, description="seconds between push rounds")
    files: tuple[str, ...] = DEFAULT_SYNC_FILES
    include_checkpoints: bool = False
    connect_timeout_s: float = Field(default=10.0, gt=0)
    op_timeout_s: float = Field(default=30.0, gt=0, description="timeout of one SFTP operation")
    attempt_deadline_s: float = Field(
        default=120.0, gt=0, description="hard limit on one push round; the connection is closed"
    )
    max_backoff_s: float = Field(
        default=60.0, gt=0, description="cap of the exponential backoff while the link is down"
    )

    @field_validator("target")
    @classmethod
    def _target_parses(cls, value: str) -> str:
        parse_target(value)  # ValueError -> pydantic error naming the field
        return value

    @field_validator("files")
    @classmethod
    def _globs_stay_inside(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            parts = pattern.split("/")
            if not pattern or pattern.startswith(("/", "~")) or ".." in parts:
                raise ValueError(
                    f"files pattern {pattern!r} must be a relative glob without '..' "
                    "(it is matched under the plan's directory)"
                )
        return value

    @property
    def patterns(self) -> tuple[str, ...]:
        """The globs to push, checkpoints included when asked."""
        return self.files + (CHECKPOINT_FILES if self.include_checkpoints else ())
