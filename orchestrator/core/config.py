"""The plan (experiments.yaml), parsed once into frozen, validated objects.

``load_plan(path)`` reads the YAML, validates it with pydantic and reports every problem at once,
each as ``file:line: field: message`` (with the valid alternatives for unknown keys). Relative
paths in the plan are resolved against the plan file's directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.core.commands import (  # noqa: F401  (expand, _fill: re-exported)
    PLACEHOLDERS,
    Command,
    _cmd_str,
    _fill,
    check_command,
    expand,
)
from orchestrator.core.criteria import Criterion
from orchestrator.core.pruning import PruneConfig
from orchestrator.core.refnames import branch_name, ref_component
from orchestrator.errors import ConfigError, CriteriaError
from orchestrator.paths import RESERVED_NAMES, RESERVED_WORKER_NAMES
from orchestrator.remote.sync_config import SyncConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
class StallAction(str, Enum):
    """What the controller does with a run that wrote no metric for stall_timeout_s."""

    warn = "warn"  # flag it in the dashboard and state, keep it running
    restart = "restart"  # stop it and retry it with ORCH_RESUME=1 (counts as a retry)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)]


class MetricsSource(_Frozen):
    """Where a worker's metric records come from.

    - ``jsonl`` (default): ``metrics.jsonl`` in the run directory (orchestrator.reporting).
    - ``regex``: named groups of ``pattern`` matched against each line of ``file`` (default the
      run's stdout log), e.g. ``step (?P<step>\\d+) .* loss: (?P<loss>\\S+)``.
    - ``csv``: a CSV log with a header (Lightning's CSVLogger ``metrics.csv``); ``path``.
    - ``tensorboard``: scalar summaries from the event files under ``path``.

    ``path`` is relative to the run directory (``{worktree}`` and ``{run_dir}`` are expanded).
    For ``csv`` and ``tensorboard`` it may be a glob (``lightning_logs/version_*/metrics.csv``):
    among the matches created after the attempt started, the newest is read, so a retried
    Lightning attempt is followed into its new ``version_N`` folder and an older race's files
    are never read. ``rename`` maps names as the logger writes them to names for the criteria
    (``{Loss/test: test_loss}``); criteria may also quote such names in backquotes.
    """

    source: Literal["jsonl", "regex", "csv", "tensorboard"] = "jsonl"
    path: str | None = None
    pattern: str | None = None
    rename: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> MetricsSource:
        if self.source == "regex":
            if not self.pattern:
                raise ValueError("source 'regex' needs a 'pattern' with named groups")
            try:
                compiled = re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern is not a valid regular expression: {e}") from None
            if not compiled.groupindex:
                raise ValueError("pattern needs named groups, e.g. (?P<val_loss>\\S+)")
            if not {"epoch", "step"} & set(compiled.groupindex):
                raise ValueError("pattern needs a group named 'epoch' or 'step'")
        elif self.pattern is not None:
            raise ValueError(f"'pattern' is only used with source 'regex', not {self.source!r}")
        if self.source in ("csv", "tensorboard") and not self.path:
            raise ValueError(f"source {self.source!r} needs a 'path'")
        return self


def _not_reserved_worker(name: str) -> str:
    """A worker name that is not one of the experiment folder's own entries."""
    if name in RESERVED_WORKER_NAMES:
        raise ValueError(f"{name!r} names a folder of the experiment's results; rename the "
                         f"worker (reserved: {', '.join(sorted(RESERVED_WORKER_NAMES))})")
    return name


class WorkerConfig(_Frozen):
    """One approach: a branch, a command, its environment and optional overrides."""

    name: Annotated[Name, AfterValidator(_not_reserved_worker)]
    branch: str = Field(min_length=1)
    command: Command
    shell: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    priority: int = 0
    max_epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    max_time_s: float | None = Field(default=None, gt=0)
    criteria: tuple[Criterion, ...] | None = None
    metrics: MetricsSource = MetricsSource()
    control: bool = False  # a negative control: runs and reports, never wins (see Controller)

    _cmd = field_validator("command")(check_command)

    @field_validator("branch")
    @classmethod
    def _branch(cls, v: str) -> str:
        return branch_name(v)

    @field_validator("criteria", mode="before")
    @classmethod
    def _criteria(cls, v: Any) -> Any:
        return _parse_criteria(v)

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: (str(x) if isinstance(x, (int, float)) else x) for k, x in v.items()}
        return v


def _not_reserved(name: str) -> str:
    """An experiment name that is not one of the results directory's own folders."""
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} names a folder of the results directory; "
                         f"rename the experiment (reserved: {', '.join(sorted(RESERVED_NAMES))})")
    return name


class ExperimentConfig(_Frozen):
    """A race among workers that share success criteria."""

    name: Annotated[Name, AfterValidator(ref_component), AfterValidator(_not_reserved)]
    criteria: tuple[Criterion, ...] = Field(min_length=1)
    check_every: int = Field(default=1, ge=1)
    max_epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    max_time_s: float | None = Field(default=None, gt=0)
    setup: Command | None = None
    on_success: Command | None = None
    stop_losers: bool = True  # False: record the first winner but let every worker finish
    prune: PruneConfig | None = None  # stop hopeless workers early (orchestrator.core.pruning)
    workers: tuple[WorkerConfig, ...] = Field(min_length=1)

    _cmd = field_validator("setup", "on_success")(
        lambda v: v if v is None else check_command(v)
    )

    @field_validator("criteria", mode="before")
    @classmethod
    def _criteria(cls, v: Any) -> Any:
        return _parse_criteria(v)

    @model_validator(mode="after")
    def _unique_workers(self) -> ExperimentConfig:
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError(
                "needs a budget: max_epochs (records carry 'epoch') or max_steps (records "
                "carry 'step'); max_time_s may be added to either"
            )
        for w in self.workers:
            if self.unit == "epoch" and w.max_steps is not None and w.max_epochs is None:
                raise ValueError(
                    f"worker {w.name!r} sets max_steps but the experiment counts epochs "
                    "(max_epochs); give the experiment max_steps instead"
                )
        if all(w.control for w in self.workers):
            raise ValueError("every worker is a control: at least one must be able to win")
        seen: set[str] = set()
        for w in self.workers:
            if w.name in seen:
                raise ValueError(f"duplicate worker name {w.name!r} in experiment {self.name!r}")
            seen.add(w.name)
        return self

    def criteria_for(self, worker: WorkerConfig) -> tuple[Criterion, ...]:
        """The worker's own criteria if it overrides them, else the experiment's."""
        return worker.criteria if worker.criteria is not None else self.criteria

    def worker(self, name: str) -> WorkerConfig:
        """The worker called ``name``.

        Raises:
            KeyError: no worker of that name in this experiment.
        """
        for w in self.workers:
            if w.name == name:
                return w
        raise KeyError(f"no worker {name!r} in experiment {self.name!r}")

    @property
    def unit(self) -> str:
        """``epoch`` when the budget is in epochs, else ``step``: the unit ``check_every``,
        budgets, the dashboard and every report use."""
        return "epoch" if self.max_epochs is not None else "step"

    def max_epochs_for(self, worker: WorkerConfig) -> int | None:
        return worker.max_epochs if worker.max_epochs is not None else self.max_epochs

    def max_steps_for(self, worker: WorkerConfig) -> int | None:
        return worker.max_steps if worker.max_steps is not None else self.max_steps

    def max_time_s_for(self, worker: WorkerConfig) -> float | None:
        return worker.max_time_s if worker.max_time_s is not None else self.max_time_s

    def budget_for(self, worker: WorkerConfig) -> int:
        """The worker's budget in the experiment's unit (max_epochs or max_steps)."""
        value = self.max_epochs_for(worker) if self.unit == "epoch" else self.max_steps_for(worker)
        assert value is not None  # the validator requires a budget in the unit
        return value


class RayConfig(_Frozen):
    """``executor: ray`` settings (see orchestrator/ray_executor/executor.py)."""

    address: str = "auto"
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    num_cpus_per_worker: float = Field(default=1.0, gt=0)
    num_gpus_per_worker: float = Field(default=0.0, ge=0)


class Plan(_Frozen):
    """A whole experiments.yaml. Paths are absolute after ``load_plan``."""

    repo: Path = Path(".")
    base_ref: str = "HEAD"
    worktree_root: Path = Path(".worktrees")
    results_dir: Path = Path("results")
    dashboard: Path = Path("PARALLEL_PROGRESS.md")
    poll_interval_s: float = Field(default=1.0, gt=0, le=3600)
    dashboard_interval_s: float = Field(default=2.0, ge=0)
    gpus: Literal["auto", "none"] | list[Annotated[int, Field(ge=0)]] = "auto"
    workers_per_gpu: int = Field(default=1, ge=1)
    max_parallel: int | None = Field(default=None, ge=1)
    grace_s: float = Field(default=30.0, ge=0)
    max_retries: int = Field(default=2, ge=0)
    retry_backoff_s: float = Field(default=5.0, ge=0)
    stall_timeout_s: float | None = Field(default=None, gt=0)
    stall_action: StallAction = StallAction.warn
    executor: Literal["local", "ray"] = "local"
    ray: RayConfig | None = None
    sync: SyncConfig | None = None
    experiments: tuple[ExperimentConfig, ...] = Field(min_length=1)

    # Set by load_plan, not by the YAML.
    source: Path | None = Field(default=None, exclude=True)
    # Run a dirty worktree (its diff saved) instead of refusing it; tag the winning commit
    # <tag_prefix>/<experiment>/<race-id> unless tag: false (core.provenance, core.pinning).
    allow_dirty: bool = False
    tag: bool = True
    tag_prefix: Annotated[str, AfterValidator(ref_component)] = "race"

    @model_validator(mode="after")
    def _unique_experiments(self) -> Plan:
        seen: set[str] = set()
        for e in self.experiments:
            if e.name in seen:
                raise ValueError(f"duplicate experiment name {e.name!r}")
            seen.add(e.name)
        branches: dict[str, str] = {}
        for e in self.experiments:
            for w in e.workers:
                key = f"{e.name}/{w.name}"
                if w.branch in branches:
                    raise ValueError(
                        f"branch {w.branch!r} is used by both {branches[w.branch]} and {key}; "
                        "a branch can be checked out in one worktree only"
                    )
                branches[w.branch] = key
        if self.executor == "ray" and self.ray is None:
            object.__setattr__(self, "ray", RayConfig())
        return self

    @property
    def plan_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def workers(self) -> Iterable[tuple[ExperimentConfig, WorkerConfig]]:
        """Every (experiment, worker) pair in plan order."""
        for e in self.experiments:
            for w in e.workers:
                yield e, w

    def find(self, experiment: str, worker: str) -> tuple[ExperimentConfig, WorkerConfig]:
        for e, w in self.workers():
            if e.name == experiment and w.name == worker:
                return e, w
        raise KeyError(f"{experiment}/{worker}")

    def worktree_path(self, worker: WorkerConfig, experiment: ExperimentConfig) -> Path:
        """``worktree_root/<experiment>/<worker>``; names are validated so it cannot escape."""
        return self.worktree_root / experiment.name / worker.name

    def rerun_worktree_path(self, worker: WorkerConfig, experiment: ExperimentConfig,
                            race_id: str) -> Path:
        """``worktree_root/_reruns/<race-id>/<experiment>/<worker>``: the detached worktree of
        ``rerun --race`` (``_``: no experiment name starts with it)."""
        return self.worktree_root / "_reruns" / race_id / experiment.name / worker.name


def _parse_criteria(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise ValueError("criteria must be a list of expressions")
    out, errors = [], []
    for expr in v:
        if not isinstance(expr, str):
            errors.append(f"criterion {expr!r} must be a string expression")
            continue
        try:
            out.append(Criterion.parse(expr))
        except CriteriaError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("; ".join(errors))
    return tuple(out)


# -- YAML with line numbers -------------------------------------------------------------------


@dataclass
class _Located:
    """Line numbers of every node in the YAML document, by pydantic-style location tuple."""

    lines: dict[tuple[Any, ...], int]
    keys: dict[tuple[Any, ...], list[str]]

    def line_for(self, loc: tuple[Any, ...]) -> int | None:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None


def _index_nodes(node: yaml.Node, loc: tuple[Any, ...], out: _Located, dupes: list[str]) -> None:
    out.lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        names: list[str] = []
        for key_node, value_node in node.value:
            key = key_node.value
            if key in names:
                dupes.append(
                    f"{node.start_mark.name}:{key_node.start_mark.line + 1}: "
                    f"{_loc_str(loc + (key,))}: duplicate key {key!r}"
                )
            names.append(key)
            out.lines[loc + (key,)] = key_node.start_mark.line + 1
            _index_nodes(value_node, loc + (key,), out, dupes)
        out.keys[loc] = names
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_nodes(item, loc + (i,), out, dupes)


def _loc_str(loc: tuple[Any, ...]) -> str:
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s or "(top level)"


_MODELS_AT: dict[str, type[BaseModel]] = {}


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Which config class describes the mapping at ``loc`` (for listing valid keys)."""
    model: type[BaseModel] | None = Plan
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _model_in_annotation(field.annotation)
    return model


def _model_in_annotation(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in_annotation(arg)
        if found is not None:
            return found
    return None


def _format_error(err: Any, located: _Located, file: str) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # pydantic adds union-member tags ("str", "list[str]") to loc; drop what is not a field.
    while loc and isinstance(loc[-1], str) and loc not in located.lines:
        model = _model_for(loc[:-1])
        if err["type"] == "extra_forbidden" or (model and loc[-1] in model.model_fields):
            break
        loc = loc[:-1]
    line = located.line_for(loc)
    where = f"{file}:{line}" if line else file
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_for(loc[:-1])
        valid = ", ".join(sorted(model.model_fields)) if model else "?"
        valid = valid.replace("source, ", "") if model is Plan else valid
        return f"{where}: {_loc_str(loc)}: unknown key {loc[-1]!r}; valid keys: {valid}"
    if kind == "missing":
        return f"{where}: {_loc_str(loc)}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        msg = (
            f"{err.get('input')!r} is not a valid name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (names become folder names, so '/' and '..' are "
            "not allowed)"
        )
    return f"{where}: {_loc_str(loc)}: {msg}"


def _union_noise(err: Any) -> bool:
    """Hide the duplicate branch of an error pydantic reports once per union member."""
    loc = err["loc"]
    return bool(loc) and loc[-1] in ("list[str]",) or (
        len(loc) >= 1 and loc[-1] == "str" and err["type"] == "string_type"
    )


def _implied(err: Any, errors: list[Any]) -> bool:
    """A 'too short' error caused by its own items failing is noise."""
    if err["type"] != "too_short":
        return False
    n = len(err["loc"])
    return any(len(o["loc"]) > n and o["loc"][:n] == err["loc"] for o in errors)


def _line_of(problem: str) -> int:
    m = re.match(r"^.*?:(\d+):", problem)
    return int(m.group(1)) if m else 0


def _duplicate_names(data: dict, located: _Located, file: str) -> list[str]:
    """Duplicate experiment names, worker names and branches, each with its line."""
    out: list[str] = []
    experiments = data.get("experiments")
    if not isinstance(experiments, list):
        return out
    seen_exp: dict[str, int] = {}
    seen_branch: dict[str, str] = {}
    for i, e in enumerate(experiments):
        if not isinstance(e, dict):
            continue
        name = e.get("name")
        if isinstance(name, str):
            if name in seen_exp:
                line = located.line_for(("experiments", i, "name"))
                out.append(
                    f"{file}:{line}: experiments[{i}].name: duplicate experiment name {name!r} "
                    f"(also experiments[{seen_exp[name]}]); names must be unique"
                )
            seen_exp.setdefault(name, i)
        workers = e.get("workers")
        if not isinstance(workers, list):
            continue
        seen_w: dict[str, int] = {}
        for j, w in enumerate(workers):
            if not isinstance(w, dict):
                continue
            loc = ("experiments", i, "workers", j)
            wname, branch = w.get("name"), w.get("branch")
            if isinstance(wname, str):
                if wname in seen_w:
                    out.append(
                        f"{file}:{located.line_for(loc + ('name',))}: {_loc_str(loc)}.name: "
                        f"duplicate worker name {wname!r} (also workers[{seen_w[wname]}])"
                    )
                seen_w.setdefault(wname, j)
            if isinstance(branch, str):
                here = f"{_loc_str(loc)}"
                if branch in seen_branch:
                    out.append(
                        f"{file}:{located.line_for(loc + ('branch',))}: {here}.branch: branch "
                        f"{branch!r} is also used by {seen_branch[branch]}; a branch can be "
                        "checked out in one worktree only"
                    )
                seen_branch.setdefault(branch, here)
    return out


def load_plan(path: str | Path) -> Plan:
    """Parse and validate a plan file.

    Args:
        path: the YAML plan (e.g. experiments.yaml).

    Returns:
        A frozen ``Plan`` whose paths (repo, worktree_root, results_dir, dashboard) are absolute.

    Raises:
        ConfigError: the file is missing or unreadable, is not YAML, or fails validation; the
            exception's ``problems`` lists every problem as ``file:line: field: message``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"plan file {str(path)!r} not found",
            hint="pass the path of an experiments.yaml (see README.md, 'The plan file')",
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read plan file {str(path)!r}: {e}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        message = f"{where}: not valid YAML: {problem}"
        raise ConfigError(message, [message]) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the plan must be a mapping with an 'experiments' list at the top level"
        )
    located = _Located({}, {})
    dupes: list[str] = []
    if node is not None:
        _index_nodes(node, (), located, dupes)
    problems = [p.replace("<unicode string>", str(path)) for p in dupes]
    problems += _duplicate_names(data, located, str(path))
    try:
        plan = Plan.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        for err in errors:
            if _union_noise(err) or _implied(err, errors):
                continue
            if err["type"] == "value_error" and "duplicate" in err["msg"] and problems:
                continue  # already reported with its line by _duplicate_names
            problems.append(_format_error(err, located, str(path)))
        plan = None
    if problems:
        problems = sorted(dict.fromkeys(problems), key=_line_of)
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems in {path}"
        raise ConfigError(head, problems)
    assert plan is not None
    return _resolve(plan, path.resolve())


def _resolve(plan: Plan, source: Path) -> Plan:
    base = source.parent

    def absolute(p: Path) -> Path:
        return (p if p.is_absolute() else base / p).resolve()

    return plan.model_copy(
        update={
            "repo": absolute(plan.repo),
            "worktree_root": absolute(plan.worktree_root),
            "results_dir": absolute(plan.results_dir),
            "dashboard": absolute(plan.dashboard),
            "source": source,
        }
    )


def check_relative_name(name: str) -> None:
    """Raise ValueError if ``name`` would escape a parent folder ('../x', '/x', 'a/../../b')."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{name!r} would escape its folder")


def describe(plan: Plan) -> str:
    """Human-readable summary of the plan as understood (``orchestrator validate``)."""
    lines = [
        f"plan:          {plan.source}",
        f"repo:          {plan.repo} (base ref {plan.base_ref})",
        f"worktrees:     {plan.worktree_root}",
        f"results:       {plan.results_dir}",
        f"dashboard:     {plan.dashboard}",
        f"executor:      {plan.executor}",
        f"slots:         gpus={plan.gpus if isinstance(plan.gpus, str) else list(plan.gpus)}, "
        f"workers_per_gpu={plan.workers_per_gpu}, max_parallel={plan.max_parallel or 'all'}",
        f"timing:        poll {plan.poll_interval_s}s, grace {plan.grace_s}s, "
        f"stall {plan.stall_timeout_s or 'off'} ({plan.stall_action.value}), "
        f"max_retries {plan.max_retries}",
        f"sync:          {plan.sync.target if plan.sync else 'off'}",
    ]
    for e in plan.experiments:
        lines.append("")
        budget = f"max_{e.unit}s {e.max_epochs if e.unit == 'epoch' else e.max_steps}"
        if e.max_time_s:
            budget += f", max_time_s {e.max_time_s:g}"
        lines.append(f"experiment {e.name}: {budget}, check every {e.check_every} {e.unit}s")
        for c in e.criteria:
            lines.append(f"  criterion  {c.source}")
        if e.setup:
            lines.append(f"  setup      {_cmd_str(e.setup)}")
        if e.on_success:
            lines.append(f"  on_success {_cmd_str(e.on_success)}")
        if e.prune is not None:
            lines.append(f"  prune      after {e.prune.after} evaluations, margin "
                         f"{e.prune.margin:g}, patience {e.prune.patience}")
        for w in sorted(e.workers, key=lambda w: w.priority):
            lines.append(f"  worker {w.name} (priority {w.priority}) on branch {w.branch}")
            lines.append(f"    command  {_cmd_str(w.command)}")
            if w.env:
                lines.append(f"    env      {w.env}")
            if w.max_epochs is not None:
                lines.append(f"    max_epochs {w.max_epochs}")
            if w.criteria is not None:
                lines.append(f"    criteria {' ; '.join(c.source for c in w.criteria)}")
            if w.metrics.source != "jsonl":
                lines.append(f"    metrics  {w.metrics.source} {w.metrics.path or ''}")
    return "\n".join(lines)


