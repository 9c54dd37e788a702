"""The layout's rules, checked on the source: import arrows, no circles, a core without torch.

README "Architecture" states the arrows: the race core imports no view, no Ray, no CLI; views
and remote never import the controller; running code never calls back into the controller.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import fake, write_plan

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every orchestrator module ``path`` imports: top level, in functions, in TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}: relative import (use absolute orchestrator.* ones)")
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    found.add(f"{node.module}.{alias.name}")
            if node.module in modules:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found


GRAPH = {name: _imports(path, _modules()) for name, path in _modules().items()}


def _cycle_from(start: str) -> list[str] | None:
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, trail = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == start:
                return trail + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return None


def test_no_import_circles_type_checking_imports_included() -> None:
    cycles = [c for m in GRAPH if (c := _cycle_from(m))]
    assert not cycles, cycles[0]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("orchestrator.core", ("orchestrator.views", "orchestrator.ray_executor",
                               "orchestrator.session", "orchestrator.cli")),
        ("orchestrator.views", ("orchestrator.core.controller", "orchestrator.session",
                                "orchestrator.cli")),
        ("orchestrator.remote", ("orchestrator.core.controller", "orchestrator.views",
                                 "orchestrator.session", "orchestrator.cli")),
        ("orchestrator.running", ("orchestrator.core.controller", "orchestrator.views",
                                  "orchestrator.session", "orchestrator.cli")),
        ("orchestrator.sources", ("orchestrator.core.controller", "orchestrator.views")),
    ],
)
def test_import_arrows_run_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    bad = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items() if m.startswith(package)
        for t in targets if t.startswith(forbidden)
    ]
    assert not bad, bad


def test_modules_stay_small_and_nothing_knows_a_research_job() -> None:
    too_long = {
        m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 650
    }
    assert not too_long, too_long
    for name, path in _modules().items():
        text = path.read_text().lower()
        for word in ("attention_ratio", "persistence", "clip", "fvlm", "trajectory"):
            assert word not in text, f"{name} mentions {word!r}: job code belongs with its job"


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"torch", "transformers", "diffusers", "tokenizers", "scipy"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def test_core_imports_validates_and_races_without_torch_or_scipy(repo: Path, leak_check: str) -> None:
    plan = write_plan(repo, [
        {"name": "w", "branch": "r/w", "command": fake("--epochs", 20, "--interval", 0.05,
                                                       "--metric", "acc=0.2*epoch")},
    ], criteria=["acc >= 0.6"])
    skip = ("orchestrator.ray_executor", "orchestrator.views.race_report",
            "orchestrator.views.plots")
    names = sorted(m for m in GRAPH if not m.startswith(skip) and not m.endswith("__main__"))
    code = BLOCKER + textwrap.dedent(
        f"""
        import importlib
        for name in {names!r}:
            importlib.import_module(name)
        from orchestrator.core.config import load_plan
        from orchestrator.session import build_controller
        plan = load_plan({str(plan)!r})
        controller = build_controller(plan)
        rc = controller.run()
        print("rc", rc, controller.state.experiments["race"].winner)
        print("loaded", sorted(m for m in {{"torch", "transformers", "scipy", "tokenizers",
                                            "diffusers"}} if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "rc 0 w" in out.stdout and "loaded []" in out.stdout, out.stdout
    # the race report is rendered by a detached process (it may import what it likes)
    from tests.conftest import wait_for

    wait_for(lambda: (repo / "results" / "race" / "race_report" / "RACE_REPORT.md").exists(),
             timeout=60)


def test_help_and_validate_import_no_heavy_module(repo: Path) -> None:
    plan = write_plan(repo, [{"name": "w", "branch": "r/w", "command": fake("--epochs", 1)}])
    code = textwrap.dedent(
        f"""
        import sys
        from orchestrator import cli
        try:
            cli.main(["validate", {str(plan)!r}])
        except SystemExit:
            pass
        heavy = {{"torch", "transformers", "matplotlib", "scipy", "paramiko", "ray"}}
        print("loaded", sorted(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("loaded []"), out.stdout
