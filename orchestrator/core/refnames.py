"""Which names git accepts as refs (branches, tags), checked in-process (stdlib only: the plan
loader uses it, and must not start a git process per worker or import GitPython)."""

from __future__ import annotations

_REF_FORBIDDEN = set(" ~^:?*[\\")


def ref_format_problem(name: str, *, what: str = "branch name") -> str | None:
    """Why git would refuse ``name`` as (part of) a ref, or None if it is valid.

    The rules of ``git check-ref-format --branch`` (no ``..``, ``@{``, control characters,
    space or any of ``~^:?*[\\``; no component starting with ``.`` or ending in ``.lock``; no
    leading/trailing/double ``/``; not ending in ``.``; not ``@``), checked without a git
    process so a plan is validated in microseconds.
    """
    problem = None
    if not name:
        problem = "it is empty"
    elif name == "@":
        problem = "'@' alone is not allowed"
    elif name.startswith("-"):
        problem = "it starts with '-'"
    elif ".." in name:
        problem = "it contains '..'"
    elif "@{" in name:
        problem = "it contains '@{'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it contains a control character"
    elif bad := sorted(set(name) & _REF_FORBIDDEN):
        problem = "it contains " + " ".join(repr(c) for c in bad)
    elif name.startswith("/") or name.endswith("/") or "//" in name:
        problem = "it has an empty path component ('/' at either end, or '//')"
    elif name.endswith("."):
        problem = "it ends with '.'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in name.split("/")):
        problem = "a component starts with '.' or ends with '.lock'"
    return None if problem is None else f"{name!r} is not a valid git {what}: {problem}"


def branch_name(name: str) -> str:
    """``name`` if git accepts it as a branch name (a pydantic validator).

    Raises:
        ValueError: with ``ref_format_problem``'s sentence.
    """
    if problem := ref_format_problem(name):
        raise ValueError(problem)
    return name


def ref_component(name: str) -> str:
    """``name`` if it can be part of a ref (an experiment name in a tag, a tag prefix).

    Raises:
        ValueError: with ``ref_format_problem``'s sentence.
    """
    if problem := ref_format_problem(name, what="name for a ref (it becomes part of a tag)"):
        raise ValueError(problem)
    return name
