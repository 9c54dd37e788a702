"""Commands in a plan: placeholders, literal braces, and turning a command into an argv list.

``{repo}``, ``{worktree}``, ``{run_dir}`` ... are filled in when a command runs; ``{{`` and ``}}``
stand for literal braces (Python's ``str.format`` rule), so JSON arguments, ``awk '{{print
$1}}'`` and Hydra's ``${{...}}`` overrides pass through. Env values keep unknown braces as
written.
"""

from __future__ import annotations

import re
import shlex
import sys

PLACEHOLDERS = (
    "repo",
    "worktree",
    "run_dir",
    "results_dir",
    "experiment",
    "worker",
    "plan",
    "viz_dir",
    "checkpoint",
    "attempt",
)


Command = str | list[str]


def check_command(value: Command) -> Command:
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as e:
            raise ValueError(f"cannot split command into arguments: {e}") from None
        if not parts:
            raise ValueError("command is empty")
    elif not value:
        raise ValueError("command is empty")
    text = value if isinstance(value, str) else " ".join(value)
    text = text.replace("{{", "").replace("}}", "")  # literal braces (str.format's rule)
    for name in re.findall(r"\{([^{}]*)\}", text):
        if name not in PLACEHOLDERS:
            raise ValueError(
                f"unknown placeholder {{{name}}}; valid: "
                + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                + "; write {{ and }} for literal braces"
            )
    return value


def expand(command: Command, values: dict[str, str], *, shell: bool = False) -> list[str]:
    """Turn a plan command into an argv list with placeholders filled in.

    A string command is split with shlex (unless ``shell``, when it is run by /bin/sh -c with
    its placeholders shell-quoted). A leading ``python`` becomes this interpreter, so workers run
    in the controller's environment.

    Args:
        command: the plan's command (string or list).
        values: placeholder values (see PLACEHOLDERS); missing ones raise KeyError.

    Returns:
        argv list for subprocess (shell=False).
    """
    if shell:
        text = command if isinstance(command, str) else shlex.join(command)
        quoted = {k: shlex.quote(v) for k, v in values.items()}
        return ["/bin/sh", "-c", _fill(text, quoted, escapes=True)]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    argv = [_fill(a, values, escapes=True) for a in argv]
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def _fill(text: str, values: dict[str, str], *, escapes: bool = False) -> str:
    """Fill ``{name}`` placeholders; unknown ones stay as written. With ``escapes`` (commands,
    setup, hooks) ``{{`` and ``}}`` stand for literal braces, as in ``str.format``."""
    if not escapes:
        return re.sub(r"\{([a-z_]+)\}", lambda m: values.get(m.group(1), m.group(0)), text)

    def one(m: re.Match[str]) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        return values.get(m.group(1), m.group(0))

    return re.sub(r"\{\{|\}\}|\{([a-z_]+)\}", one, text)


def _cmd_str(command: Command) -> str:
    return command if isinstance(command, str) else shlex.join(command)
