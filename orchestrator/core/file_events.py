"""File events that wake the controller early (watchdog); polling every ``poll_interval_s``
stays the fallback, so a missing watchdog or an exhausted inotify watch limit only costs
latency."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


class FileWatcher:
    """Sets ``wake`` on any event in the folders it watches (not recursive).

    A null object when watchdog is not installed: ``watch`` and ``stop`` do nothing.
    """

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        self._watched: set[Path] = set()
        self._observer: Any = None
        self._handler: Any = None

    def start(self) -> None:
        """Start the observer thread (a no-op without watchdog)."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return
        wake = self.wake

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        self._handler = Handler()
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()

    def watch(self, folder: Path) -> None:
        """Watch ``folder`` (created if missing); watching it twice is a no-op."""
        if self._observer is None or folder in self._watched:
            return
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self._observer.schedule(self._handler, str(folder), recursive=False)
            self._watched.add(folder)
        except OSError:  # inotify watch limit: polling still works
            pass

    def stop(self) -> None:
        """Stop and join the observer thread (waits at most 2 s)."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
            self._observer = None
