"""Shipping a worktree to a Ray node with public Ray APIs only.

Ray's ``runtime_env.working_dir`` accepts a *local* directory only at the job level
(``ray.init``); per actor it wants a URI (``gcs://`` from Ray's internal upload functions, or
``s3://``/``gs://``/``https://``/``file://`` on storage every node reaches). So the launcher packs
each worktree into a deterministic zip (``pack_worktree``), puts it in the cluster's object store
once per content (``ray.put``, content-addressed by its SHA-256), and passes the ObjectRef as an
argument of the actor's ``start``; Ray moves the bytes to the node's object store, and the actor
unpacks them into a node-local directory (``unpack_worktree``) that becomes the worker's cwd.

What is packed: the files git would commit (``git ls-files --cached --others
--exclude-standard``: tracked files and untracked ones the .gitignore does not ignore), minus the
``excludes`` patterns. Outside a git worktree, every file under the directory, minus excludes.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import zipfile
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from orchestrator.errors import LaunchError

MAX_PACKAGE_BYTES = 500 << 20  # the limit Ray applies to a working_dir package
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same tree gives the same bytes


def is_excluded(rel: str, patterns: list[str]) -> bool:
    """Whether a worktree-relative posix path matches one of ``patterns``.

    A pattern ending in ``/`` (``results/``) excludes a directory of that name at any depth; a
    pattern with a ``/`` inside is matched (fnmatch) against the whole path; any other pattern
    (``*.mp4``, ``.git``) against every path component.
    """
    parts = PurePosixPath(rel).parts
    for pattern in patterns:
        if pattern.endswith("/"):
            name = pattern.rstrip("/")
            if any(fnmatch(p, name) for p in parts[:-1]):
                return True
        elif "/" in pattern.strip("/"):
            if fnmatch(rel, pattern.strip("/")) or fnmatch(rel, pattern.strip("/") + "/*"):
                return True
        elif any(fnmatch(p, pattern) for p in parts):
            return True
    return False


def worktree_files(root: Path, excludes: list[str]) -> list[str]:
    """Sorted posix paths (relative to ``root``) of the files to ship.

    Raises:
        LaunchError: ``root`` is not a directory.
    """
    if not root.is_dir():
        raise LaunchError(f"working directory {root} does not exist")
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True, timeout=60,
        ).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (subprocess.SubprocessError, OSError):  # not a git worktree: take every file
        names = [p.relative_to(root).as_posix() for p in root.rglob("*")]
    files = []
    for rel in sorted(set(names)):
        path = root / rel
        if path.is_symlink() or not path.is_file() or is_excluded(rel, excludes):
            continue  # deleted but still tracked, a directory, a link, or excluded
        files.append(rel)
    return files


def pack_worktree(root: Path, excludes: list[str],
                  max_bytes: int = MAX_PACKAGE_BYTES) -> tuple[str, bytes]:
    """Zip the shippable files of ``root`` (see ``worktree_files``) deterministically.

    Returns:
        (SHA-256 hex digest of the zip, the zip's bytes).

    Raises:
        LaunchError: ``root`` is missing, or the files add up to more than ``max_bytes``.
    """
    buffer = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for rel in worktree_files(root, excludes):
            path = root / rel
            st = path.stat()
            total += st.st_size
            if total > max_bytes:
                raise LaunchError(
                    f"the worktree {root} holds more than {max_bytes >> 20} MiB of files to ship",
                    hint="add the large files to .gitignore or ray.runtime_env.excludes, and put "
                    "data on storage every node mounts",
                )
            info = zipfile.ZipInfo(rel, date_time=ZIP_EPOCH)
            info.external_attr = (stat.S_IMODE(st.st_mode) | stat.S_IFREG) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    data = buffer.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def unpack_worktree(data: bytes, dest: Path) -> None:
    """Unpack a ``pack_worktree`` zip into ``dest`` (created), keeping file modes.

    Raises:
        ValueError: a member's path would land outside ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            target = (root / info.filename).resolve()
            if root not in target.parents:
                raise ValueError(f"unsafe path in worktree package: {info.filename!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            mode = (info.external_attr >> 16) & 0o7777
            if mode:
                os.chmod(target, mode)
