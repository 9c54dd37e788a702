"""``orchestrator watch``: pull the dashboard from the GPU box over SSH and show it live.

Run on the laptop::

    python -m orchestrator watch me@gpu-box:~/project          # live, every 5 s
    python -m orchestrator watch gpu:~/project --once --out dash   # ~/.ssh/config alias, fetch once

Every interval it fetches PARALLEL_PROGRESS.md and the images it references (only when their
remote size or mtime changed) into ``--out``, each written to a temporary file and renamed into
place, images before the page. The terminal shows the dashboard's markdown (tables included)
with rich. A dropped link is shown and retried with backoff; host-key and authentication errors
end the command (they need the user). Ctrl-C exits cleanly with status 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import posixpath
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError, SyncError
from orchestrator.remote.ssh import (
    ConnectOptions,
    LinkDownError,
    RemotePathError,
    SshSession,
    SshTarget,
    check_relative,
    classify_sftp_error,
    open_session,
    parse_target,
)
from orchestrator.remote.sync import (
    IMAGE_LINK,
    backoff_delay_s,
    image_references,
    is_checkpoint,
)
from orchestrator.reporting import atomic_write_bytes

DASHBOARD = "PARALLEL_PROGRESS.md"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``watch`` subcommand's arguments to ``parser``."""
    parser.add_argument(
        "target",
        help="the plan's folder on the GPU box: user@host:path, host:path or "
        "ssh-config-alias:path (relative paths and ~/ are under the remote home)",
    )
    parser.add_argument(
        "--interval-s", type=_positive_float, default=5.0, help="seconds between fetches"
    )
    parser.add_argument("--once", action="store_true", help="fetch once, print, exit")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("remote-dashboard"),
        help="local folder for the fetched dashboard and images (default: ./remote-dashboard)",
    )
    parser.add_argument(
        "--dashboard", default=DASHBOARD, help="dashboard path relative to the target folder"
    )
    parser.add_argument("--port", type=_port, help="SSH port (default: ~/.ssh/config, then 22)")
    parser.add_argument(
        "--key-file", type=Path, help="private key (default: ssh-agent, ~/.ssh/config, ~/.ssh/id_*)"
    )
    parser.add_argument(
        "--known-hosts", type=Path, help="known_hosts file (default: ~/.ssh/known_hosts)"
    )
    parser.add_argument("--ssh-config", type=Path, help="ssh config (default: ~/.ssh/config)")
    parser.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust a host missing from known_hosts: print its fingerprint and record it",
    )
    parser.add_argument(
        "--remote-status",
        action="store_true",
        help="also run `python -m orchestrator status --json` in the remote folder",
    )
    parser.add_argument(
        "--remote-plan",
        help="plan file for --remote-status, relative to the target folder "
        "(default: the remote CLI's default, experiments.yaml)",
    )
    parser.add_argument(
        "--remote-python",
        default="python",
        help="interpreter for --remote-status on the remote machine (e.g. .venv/bin/python)",
    )
    parser.add_argument(
        "--connect-timeout-s", type=_positive_float, default=10.0, help="SSH connect timeout"
    )
    parser.add_argument(
        "--notify",
        action="store_true",
        help="desktop notification when an experiment is decided or fails (macOS: osascript; "
        "Linux: notify-send; else the terminal bell), once per decision",
    )
    parser.add_argument(
        "--wide",
        action="store_true",
        help="every table column and full statuses (by default columns are dropped to fit "
        "the terminal: branch, then trend, slot, ETAs)",
    )


# --------------------------------------------------------------------------- fetching


@dataclass
class FetchResult:
    """What one fetch round found."""

    dashboard: str | None  # the page's text, None while the remote has none
    fetched: list[str] = field(default_factory=list)  # relative paths downloaded this round
    missing: list[str] = field(default_factory=list)  # referenced files absent remotely
    # linked files mirrored locally (reports, figures and what they embed): (label, rel path)
    linked: list[tuple[str, str]] = field(default_factory=list)


# ``[label](target)``, not preceded by ``!`` (that is an image, see IMAGE_LINK)
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(\s*(<[^>]+>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
# what a link may make ``watch`` fetch: pages and figures, never checkpoints or data
LINKED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".pdf")
MAX_PAGE_DEPTH = 3  # dashboard -> report -> a page it links -> ...


def link_references(markdown: str) -> list[tuple[str, str]]:
    """(label, relative path) of the pages and figures a markdown page links (``[..](x)``).

    The same rules as for images: URLs, absolute paths and paths with ``..`` are left out; so
    are files that are neither pages nor figures (checkpoints, per-sample records).
    """
    found: list[tuple[str, str]] = []
    for label, raw in LINK.findall(markdown):
        refs = image_references(f"![]({raw})")
        if not refs or not refs[0].lower().endswith(LINKED_SUFFIXES) or is_checkpoint(refs[0]):
            continue
        if refs[0] not in [r for _, r in found]:
            found.append((label, refs[0]))
    return found


def _atomic_download(session: SshSession, remote: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            session.sftp.getfo(remote, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DashboardFetcher:
    """Mirrors the dashboard and its images from ``session``'s root into ``out_dir``.

    The page is read every round (it is small, and read anyway for its image links) and written
    locally whenever its bytes differ. Images are downloaded when their remote (size, mtime)
    changes. SFTP gives mtime in whole seconds, so an image rewritten within the same second with
    the same size keeps its key: as git does with "racily clean" index entries, a file whose key
    was taken less than RACY_S ago is downloaded once more later, when any rewrite in that second
    is necessarily on disk, and only then trusted.
    """

    RACY_S = 1.5  # > 1 s (mtime granularity) plus time for the stat and download themselves

    def __init__(self, out_dir: Path, dashboard_rel: str = DASHBOARD) -> None:
        self.out_dir = out_dir
        self.dashboard_rel = check_relative(dashboard_rel)
        # rel -> ((size, mtime), monotonic time it was downloaded, verified after RACY_S)
        self._seen: dict[str, tuple[tuple[int | None, int | None], float, bool]] = {}

    def _fetch_if_changed(self, session: SshSession, rel: str) -> bool | None:
        """Download ``rel`` if changed: True if downloaded, False if unchanged, None if absent."""
        remote = session.remote_path(rel)
        now = time.monotonic()
        try:
            attrs = session.sftp.stat(remote)
            key = (attrs.st_size, attrs.st_mtime)
            local = self.out_dir / rel
            seen = self._seen.get(rel)
            if seen is not None and seen[0] == key and local.exists():
                if seen[2] or now - seen[1] < self.RACY_S:
                    return False
                before = local.read_bytes()
                _atomic_download(session, remote, local)
                self._seen[rel] = (key, seen[1], True)
                return local.read_bytes() != before
            _atomic_download(session, remote, local)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise classify_sftp_error(exc, op="read", path=remote, session=session) from exc
        except Exception as exc:  # noqa: BLE001 (classified and re-raised)
            raise classify_sftp_error(exc, op="read", path=remote, session=session) from exc
        self._seen[rel] = (key, now, False)
        return True

    def _read(self, session: SshSession, rel: str) -> bytes | None:
        remote = session.remote_path(rel)
        try:
            with session.sftp.open(remote, "r") as fh:
                data: bytes = fh.read()
                return data
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise classify_sftp_error(exc, op="read", path=remote, session=session) from exc
        except Exception as exc:  # noqa: BLE001
            raise classify_sftp_error(exc, op="read", path=remote, session=session) from exc

    def _write_if_changed(self, rel: str, data: bytes, result: FetchResult) -> None:
        page = self.out_dir / rel
        try:
            unchanged = page.read_bytes() == data
        except OSError:
            unchanged = False
        if not unchanged:
            page.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(page, data)
            result.fetched.append(rel)

    def _mirror(
        self, session: SshSession, rel: str, text: str, depth: int, result: FetchResult,
        visited: set[str],
    ) -> None:
        """Fetch what the page ``rel`` embeds, then the pages and figures it links (each page's
        files before the page itself)."""
        base = posixpath.dirname(rel)

        def join(ref: str) -> str | None:
            path = posixpath.normpath(posixpath.join(base, ref)) if base else ref
            try:
                return check_relative(path)
            except RemotePathError:
                return None

        for ref in image_references(text):
            path = join(ref)
            if path is None or path in visited:
                continue
            visited.add(path)
            got = self._fetch_if_changed(session, path)
            if got is None:
                result.missing.append(path)
            elif got:
                result.fetched.append(path)
        for label, ref in link_references(text):
            path = join(ref)
            if path is None or path in visited:
                continue
            visited.add(path)
            if path.lower().endswith(".md"):
                if depth >= MAX_PAGE_DEPTH:
                    continue
                data = self._read(session, path)
                if data is None:
                    result.missing.append(path)
                    continue
                self._mirror(
                    session, path, data.decode("utf-8", "replace"), depth + 1, result, visited
                )
                self._write_if_changed(path, data, result)
            else:
                got = self._fetch_if_changed(session, path)
                if got is None:
                    result.missing.append(path)
                    continue
                if got:
                    result.fetched.append(path)
            if depth == 0:
                result.linked.append((label or posixpath.basename(path), path))

    def fetch(self, session: SshSession) -> FetchResult:
        """One round: the page's images and linked reports and figures first (and what those
        pages embed), then the page, so a local page never shows a hole."""
        data = self._read(session, self.dashboard_rel)
        if data is None:
            return FetchResult(dashboard=None)
        text = data.decode("utf-8", "replace")
        result = FetchResult(dashboard=text)
        self._mirror(session, self.dashboard_rel, text, 0, result, {self.dashboard_rel})
        self._write_if_changed(self.dashboard_rel, data, result)
        return result


def remote_status(
    session: SshSession, python: str, timeout_s: float, plan: str | None = None
) -> str:
    """Run ``<python> -m orchestrator status --json [plan]`` in the remote folder; pretty JSON.

    Raises:
        SyncError: if the command fails or prints something that is not JSON.
    """
    argv = [python, "-m", "orchestrator", "status", "--json"] + (["--", plan] if plan else [])
    code, out, err = session.run(argv, timeout_s=timeout_s)
    if code != 0:
        tail = " ".join(err.strip().splitlines()[-1:]) or f"exit status {code}"
        raise SyncError(
            f"remote `{python} -m orchestrator status --json` failed: {tail}",
            hint="is the orchestrator installed there? pass --remote-python .venv/bin/python",
        )
    try:
        return json.dumps(json.loads(out), indent=2)
    except json.JSONDecodeError as exc:
        raise SyncError(f"remote status printed no JSON: {out[:200]!r}") from exc


# --------------------------------------------------------------------------- showing


def local_image_links(markdown: str, page_dir: Path) -> str:
    """Point relative image links at the fetched local copies (``file://`` URIs), so clicking
    one in the terminal opens the image; links without a local copy are left alone."""

    def replace(match: re.Match[str]) -> str:
        refs = image_references(match.group(0))
        if not refs or not (page_dir / refs[0]).is_file():
            return match.group(0)
        uri = (page_dir / refs[0]).resolve().as_uri()
        return match.group(0).replace(match.group(1), uri, 1)

    return IMAGE_LINK.sub(replace, markdown)


_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_DECISION = re.compile(r"^## (?P<exp>.+?): (?P<icon>🏆|❌)\s*(?P<what>.+)$", re.MULTILINE)


def _cells(line: str) -> list[str]:
    cells = _CELL_SPLIT.split(line.strip())[1:-1]
    return [
        c.strip().replace("\\|", "|").replace("`", "").replace("**", "").replace("<wbr>", "")
        for c in cells
    ]


def markdown_blocks(markdown: str) -> list[tuple[str, list[str] | str]]:
    """The page split into ("text", markdown) and ("table", lines) blocks, in order."""
    blocks: list[tuple[str, list[str] | str]] = []
    text: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        is_table = (
            _TABLE_ROW.match(lines[i]) and i + 1 < len(lines)
            and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1])
        )
        if not is_table:
            text.append(lines[i])
            i += 1
            continue
        if text:
            blocks.append(("text", "\n".join(text)))
            text = []
        table = [lines[i]]
        i += 2  # the header and its |---| line
        while i < len(lines) and _TABLE_ROW.match(lines[i]):
            table.append(lines[i])
            i += 1
        blocks.append(("table", table))
    if text:
        blocks.append(("text", "\n".join(text)))
    return blocks


def decisions(markdown: str) -> list[tuple[str, str, str]]:
    """(key, title, message) of every decided or failed experiment on a dashboard page.

    The dashboard titles such an experiment ``## NAME: 🏆 **WORKER** won at epoch N`` or
    ``## NAME: ❌ failed: ...``; the key names the outcome, so each decision is announced once.
    """
    out = []
    for m in _DECISION.finditer(markdown):
        what = m.group("what").replace("**", "").strip()
        title = f"{m.group('exp')}: {'decided' if m.group('icon') == '🏆' else 'failed'}"
        out.append((f"{m.group('exp')}: {what}", title, what))
    return out


def _render(
    target: SshTarget, out_dir: Path, state: dict[str, object], *, wide: bool = False
) -> _WatchView:
    return _WatchView(target, out_dir, state, wide)


class _WatchView:
    """The terminal view of one fetch: header, the page with its tables fitted to the
    terminal's width (rendered at draw time), the mirrored linked files, the remote status."""

    def __init__(
        self, target: SshTarget, out_dir: Path, state: dict[str, object], wide: bool
    ) -> None:
        self.target, self.out_dir, self.state, self.wide = target, out_dir, state, wide

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.markdown import Markdown
        from rich.text import Text

        from orchestrator.terminal import fit_table

        state = self.state
        header = Text()
        header.append(f"watch {self.target}", style="bold")
        header.append(f"  ->  {self.out_dir}\n")
        fetched_at = state.get("fetched_at")
        if isinstance(fetched_at, float):
            header.append(f"last fetch {time.strftime('%H:%M:%S', time.localtime(fetched_at))}")
        error = state.get("error")
        if error:
            header.append(f"  link: {error}", style="bold red")
        else:
            header.append("  link: ok", style="green")
        yield header
        text = state.get("dashboard")
        page_dir = self.out_dir / posixpath.dirname(str(state.get("dashboard_rel", "")))
        if isinstance(text, str):
            for kind, block in markdown_blocks(text):
                if kind == "table" and isinstance(block, list):
                    rows = [_cells(line) for line in block[1:]]
                    headers = _cells(block[0])
                    rows = [r + [""] * (len(headers) - len(r)) for r in rows]
                    yield Text("")
                    yield fit_table(
                        headers, [r[: len(headers)] for r in rows],
                        width=options.max_width, wide=self.wide,
                    )
                    yield Text("")
                elif isinstance(block, str) and block.strip():
                    yield Markdown(local_image_links(block, page_dir))
        else:
            yield Text("(no dashboard on the remote yet)", style="dim")
        linked = state.get("linked")
        if isinstance(linked, list) and linked:
            listing = Text("linked files, mirrored here:\n", style="bold")
            for label, rel in linked:
                local = self.out_dir / rel
                listing.append(f"  {label}:\n    ")
                listing.append(str(local), style=f"link {local.resolve().as_uri()}")
                listing.append("\n")
            yield listing
        missing = state.get("missing")
        if isinstance(missing, list) and missing:
            yield Text(f"not on the remote yet: {', '.join(missing)}", style="yellow")
        status_json = state.get("status_json")
        if isinstance(status_json, str):
            from rich.syntax import Syntax

            yield Syntax(status_json, "json")


def _options(args: argparse.Namespace) -> ConnectOptions:
    return ConnectOptions(
        port=args.port,
        key_file=args.key_file,
        known_hosts=args.known_hosts,
        accept_new_host_key=args.accept_new_host_key,
        ssh_config=args.ssh_config,
        connect_timeout_s=args.connect_timeout_s,
        op_timeout_s=max(args.connect_timeout_s, 10.0),
    )


def run_watch(args: argparse.Namespace) -> int:
    """The ``watch`` command. Returns the exit status (0, also after Ctrl-C).

    Raises:
        OrchestratorError subclasses for what the user must fix (bad target, unknown or changed
        host key, authentication, missing remote folder); with ``--once`` also a down link.
    """
    from rich.console import Console
    from rich.live import Live

    try:
        target = parse_target(args.target)
    except ValueError as exc:
        raise RemotePathError(str(exc)) from None
    options = _options(args)
    out_dir = Path(args.out).expanduser()
    fetcher = DashboardFetcher(out_dir, args.dashboard)
    console = Console()
    session: SshSession | None = None
    wide = bool(getattr(args, "wide", False))
    notifier = None
    if getattr(args, "notify", False):
        from orchestrator.terminal import Notifier, default_notify_command

        notifier = Notifier(default_notify_command(), bell=sys.stdout)
    primed = False

    def announce(text: str | None) -> None:
        """Ping once per decision; decisions on the first page fetched predate the watch."""
        nonlocal primed
        if notifier is None or text is None:
            return
        for key, title, message in decisions(text):
            if primed:
                notifier.announce(key, title, message)
            else:
                notifier.seen(key)
        primed = True

    def round_trip() -> dict[str, object]:
        nonlocal session
        if session is None or not session.alive:
            if session is not None:
                session.close()
            session = open_session(target, options, deadline_s=4 * options.connect_timeout_s)
            if session.new_host_key:
                console.print(
                    f"warning: added {session.endpoint.label}'s host key {session.new_host_key} "
                    f"to {session.endpoint.known_hosts}",
                    style="yellow",
                    highlight=False,
                )
        result = fetcher.fetch(session)
        state: dict[str, object] = {
            "dashboard": result.dashboard,
            "dashboard_rel": fetcher.dashboard_rel,
            "missing": result.missing,
            "linked": result.linked,
            "fetched_at": time.time(),
            "error": None,
        }
        if args.remote_status:
            state["status_json"] = remote_status(
                session, args.remote_python, options.op_timeout_s, args.remote_plan
            )
        return state

    try:
        if args.once:
            state = round_trip()
            if state["dashboard"] is None:
                raise SyncError(
                    f"no {args.dashboard} in {target}",
                    hint="is the controller running there with this dashboard path?",
                )
            console.print(_render(target, out_dir, state, wide=wide))
            return 0
        state = {"dashboard": None, "error": "connecting..."}
        failures = 0
        rng = random.Random()
        with Live(
            _render(target, out_dir, state, wide=wide), console=console, auto_refresh=False
        ) as live:
            while True:
                try:
                    state = round_trip()
                    dashboard = state.get("dashboard")
                    announce(dashboard if isinstance(dashboard, str) else None)
                    failures = 0
                    wait_s = args.interval_s
                except LinkDownError as exc:
                    failures += 1
                    wait_s = backoff_delay_s(failures, base_s=1.0, cap_s=30.0, rng=rng)
                    state = {**state, "error": f"{exc}; retrying in {wait_s:.0f} s"}
                    if session is not None:
                        session.close()
                        session = None
                live.update(_render(target, out_dir, state, wide=wide), refresh=True)
                time.sleep(wait_s)
    except KeyboardInterrupt:
        console.print("watch stopped")
        return 0
    finally:
        if session is not None:
            session.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.remote.watch``: the same command before the CLI wires it in."""
    parser = argparse.ArgumentParser(prog="orchestrator watch", description=__doc__.split("\n")[0])
    add_watch_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_watch(args)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
