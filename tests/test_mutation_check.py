"""The mutation spot-check (scripts/mutation_check.py, a developer tool run by hand) stays
current: every text it mutates occurs exactly once in the source, and every test it runs exists.
A refactor that moves one of them makes this fail instead of the script reporting "stale"."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutations() -> list:
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" /
                                                  "mutation_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module
    spec.loader.exec_module(module)
    return module.MUTATIONS


def test_every_mutation_text_occurs_once_and_every_target_test_exists() -> None:
    mutations = _mutations()
    assert len(mutations) >= 19
    for m in mutations:
        for file, old, new in m.edits:
            text = (ROOT / file).read_text()
            assert text.count(old) == 1, f"{m.name}: {old!r} occurs {text.count(old)}x in {file}"
            assert old != new, m.name
    node_ids = sorted({t for m in mutations for t in m.tests})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *node_ids],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
