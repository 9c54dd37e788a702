"""The SyncError subclasses of the SSH layer, one per thing a user (or the retry loop) acts on.

``LinkDownError`` and its subclass ``HostNotFoundError`` are the transient ones; the others need
the user. None of them carries key material.
"""

from __future__ import annotations

from orchestrator.errors import SyncError


class LinkDownError(SyncError):
    """The network path is down or slow (refused, timed out, reset): retry with backoff."""


class HostNotFoundError(LinkDownError):
    """The host name does not resolve (typo, or DNS down while the laptop roams)."""


class HostKeyUnknownError(SyncError):
    """The host is not in known_hosts; ``fingerprint`` is the key it presented (SHA256:...)."""

    def __init__(self, message: str, fingerprint: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.fingerprint = fingerprint


class HostKeyMismatchError(SyncError):
    """The host presented a different key than known_hosts records: refused, never retried."""

    def __init__(self, message: str, fingerprint: str, expected_fingerprint: str, hint: str):
        super().__init__(message, hint)
        self.fingerprint = fingerprint
        self.expected_fingerprint = expected_fingerprint


class AuthError(SyncError):
    """No offered key was accepted (or the only key needs a passphrase): never retried."""


class RemotePathError(SyncError):
    """A remote path is malformed or would leave the target directory."""


class RemotePermissionError(SyncError):
    """The remote account may not create or write a path under the target directory."""


class RemoteDiskFullError(SyncError):
    """The remote file system has no space left for the upload."""


class RemoteIOError(SyncError):
    """Any other failed SFTP operation (missing directory, read-only file system, ...)."""


def one_line(exc: BaseException) -> str:
    """``exc`` as one line for a message (its type name when it has no text)."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
