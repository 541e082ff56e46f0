"""Declarative search spaces: a YAML file under search_spaces/ validated into typed objects.

A file names the base TrainConfig, the dimensions to vary (dotted TrainConfig
keys), what to optimise, how many trials, the scheduler and the resources per
trial. Every problem is reported as one line naming the file and the key.

Example (search_spaces/mask_ratio_tiny.yaml)::

    name: mask-ratio-tiny
    base: {epochs: 3, optim: {blr: 5.0e-3}}
    dimensions:
      masking.mask_ratio: {grid: [0.15, 0.5, 0.75, 0.9]}
    metric: linear_probe_acc
    mode: max
    scheduler: {type: none}
"""

from __future__ import annotations

import builtins
import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from mae_search.config import (
    RENAMED,
    ConfigError,
    StrictModel,
    TrainConfig,
    describe_validation_error,
    known_parameters,
    read_text,
    read_yaml,
)
from mae_search.metrics import BY_NAME, NAMES, SELECTABLE, VAL_PREFIX, test_name, val_name
from mae_search.parsing import Epochs, at_most

MAX_SAMPLES = 100_000


class Dimension(StrictModel):
    """Exactly one of: grid (fixed values, a one-factor ablation), choice, uniform, loguniform, int,
    or variants (named bundles of settings, e.g. original vs improved MAE; run like a grid)."""

    grid: list[Any] | None = None
    variants: dict[str, dict[str, Any]] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int: tuple[builtins.int, builtins.int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        set_kinds = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(set_kinds) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform, int")
        kind = set_kinds[0]
        if kind in ("grid", "choice", "variants") and not getattr(self, kind):
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("grid", "choice"):
            values = getattr(self, kind)
            repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if repeated is not None:
                raise ValueError(f"{kind} lists {repeated!r} twice (it would run the same trials twice)")
        if kind in ("uniform", "loguniform", "int"):
            lo, hi = getattr(self, kind)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{kind} range [{lo}, {hi}] must be finite")
            if not lo < hi:
                raise ValueError(f"{kind} range [{lo}, {hi}] must have low < high")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform range [{lo}, {hi}] must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values that must each give a valid TrainConfig: every listed value, or the range ends."""
        value = getattr(self, self.kind)
        return list(value.values()) if self.kind == "variants" else list(value)

    @property
    def values(self) -> list[Any]:
        """The discrete values a grid runs (variant names for variants)."""
        return list(self.variants) if self.kind == "variants" else list(self.grid or self.choice or [])


class Objective(StrictModel):
    metric: str
    mode: Literal["max", "min"]

    @model_validator(mode="after")
    def _known_metric(self) -> Objective:
        if self.metric not in BY_NAME:
            raise ValueError(f"unknown metric '{self.metric}' (known: {', '.join(NAMES)})")
        return self


class SchedulerSpec(StrictModel):
    """ASHA early stopping, in epochs; ``none`` runs every trial to the end (a full ablation)."""

    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    max_epochs: Epochs | None = None


class Resources(StrictModel):
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    runner: Literal["auto", "ray_task", "ray_train"] = Field(
        "auto", description="how a seed trains: ray_task (one process, no start-up beyond Tune's own), ray_train "
                            "(a Ray Train worker group, DDP; about 9 s more per trial); auto: ray_task for one worker")

    @model_validator(mode="after")
    def _one_task_is_one_worker(self) -> Resources:
        if self.runner == "ray_task" and self.workers > 1:
            raise ValueError(f"runner ray_task trains in one process; workers: {self.workers} (DDP) needs "
                             f"runner: ray_train or auto")
        return self

    @property
    def uses_ray_train(self) -> bool:
        """Whether seeds run as Ray Train worker groups rather than as single Ray tasks."""
        return self.runner == "ray_train" or (self.runner == "auto" and self.workers > 1)


class SearchSpace(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    factor: str | None = Field(None, description="the ablated parameter a report table is built around")
    baseline: Any = Field(None, description="the factor's reference setting for paired comparisons")
    base: TrainConfig = Field(default_factory=TrainConfig, description="the configuration every trial starts from")
    dimensions: dict[str, Dimension] = Field(default_factory=dict)
    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    objectives: list[Objective] | None = None
    select_on: Literal["val", "test"] = Field(
        "val", description="the split objectives are measured on: val (carved from the labelled training images) "
        "or test, which makes every reported best optimistic and the report says so")
    num_samples: Annotated[int, at_most(MAX_SAMPLES, "trials", "a search that runs for years is a typo")] = Field(
        1, ge=1, description="Optuna: trials; grid: repetitions of the whole grid")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    seeds_per_trial: int = Field(
        1, ge=1, le=64, description="train every configuration on this many seeds and optimise their mean")
    sampler: Literal["tpe", "random", "cmaes", "nsga2", "gp"] = "tpe"
    startup_trials: int | None = Field(
        None, ge=1, description="tpe, gp, cmaes: trials sampled at random before the model guides the rest "
        "(Optuna's n_startup_trials; its default, 10 for tpe, makes a search of 10 trials or fewer random)")
    scheduler: SchedulerSpec = SchedulerSpec()
    initial_points: list[dict[str, Any]] = Field(
        default_factory=list, description="Optuna: configurations to evaluate first (known-good settings)"
    )
    max_concurrent_trials: int = Field(2, ge=1)
    resources: Resources = Resources()
    max_failures: int = Field(2, ge=0, description="restarts of a trial from its last checkpoint")
    labels: dict[str, str] = Field(
        default_factory=dict, description="how reports name a dimension, e.g. {masking.mask_ratio: mask ratio}")
    experiment: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
        description="MLflow experiment name; defaults to the space name (a name, never a path)",
    )

    @model_validator(mode="after")
    def _objectives(self) -> SearchSpace:
        if self.objectives is None:
            if self.metric is None or self.mode is None:
                raise ValueError("give metric and mode, or objectives")
            self.objectives = [Objective(metric=self.metric, mode=self.mode)]
        elif self.metric is not None and [(o.metric, o.mode) for o in self.objectives] != [(self.metric, self.mode)]:
            raise ValueError("give either metric/mode or objectives, not both")
        if len(self.objectives) > 1 and self.scheduler.type == "asha":
            raise ValueError("ASHA needs a single metric; use scheduler: {type: none} with several objectives")
        k = self.seeds_per_trial
        if k > 1 and len(self.seeds) == 1:  # seeds: [s] with k seeds per trial means s, s+1, ..., s+k-1
            self.seeds = [self.seeds[0] + i for i in range(k)]
        if k > 1 and len(self.seeds) != k:
            raise ValueError(f"seeds_per_trial {k}: give one seed (the first of {k}) or exactly {k} seeds, "
                             f"not {len(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed")
        return self

    # ----------------------------------------------------------------- derived

    @property
    def primary(self) -> Objective:
        return self.objectives[0]

    @property
    def is_grid(self) -> bool:
        """A grid ablation runs every listed value; any sampled dimension makes it an Optuna search."""
        return all(d.kind in ("grid", "variants") for d in self.dimensions.values())

    @property
    def ablated_factor(self) -> str | None:
        if self.factor:
            return self.factor
        return next(iter(self.dimensions)) if len(self.dimensions) == 1 else None

    @property
    def seed_averaged(self) -> bool:
        """Each trial trains its configuration on every seed and reports their mean (seeds_per_trial > 1)."""
        return self.seeds_per_trial > 1

    def label_of(self, key: str) -> str:
        """A dimension's name in reports: the file's label, else its last dotted part in words."""
        key = key.removeprefix("param.")
        return self.labels.get(key) or key.rsplit(".", 1)[-1].replace("_", " ")

    def seeds_of_trial(self, config: dict[str, Any]) -> list[int]:
        """The seeds a Tune trial trains: all of them for a seed-averaged space, else the trial's own."""
        return list(self.seeds) if self.seed_averaged else [int(config.get("seed", self.seeds[0]))]

    def trial_config(self, params: dict[str, Any], seed: int) -> TrainConfig:
        """Resolve a trial's parameters (variant names expand to their settings) into a TrainConfig."""
        overrides: dict[str, Any] = {}
        for key, value in params.items():
            dim = self.dimensions.get(key)
            if dim is not None and dim.kind == "variants":
                overrides.update(dim.variants[value])
            else:
                overrides[key] = value
        return self.base.with_overrides({**overrides, "seed": seed}, source=f"search '{self.name}'")

    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.dimensions.values()) if self.is_grid else 0

    def total_trials(self) -> int:
        if self.is_grid:
            seed_trials = 1 if self.seed_averaged else len(self.seeds)
            return max(1, self.grid_size()) * seed_trials * self.num_samples
        return self.num_samples


def load_search_space(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Read and fully validate a search-space file; raise ConfigError with one line on any problem.

    ``overrides`` (dotted keys) are applied to ``base`` first, e.g. ``data.path``
    for a space written for a data set that lives at a different path here.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found")
    raw = read_yaml(read_text(path), str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if overrides:
        base = raw.get("base") or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: base: expected a mapping")
        try:
            merged = TrainConfig.from_dict(base, source=f"{path}: base").with_overrides(overrides, source="--set")
        except ConfigError as exc:
            raise ConfigError(str(exc)) from None
        raw = {**raw, "base": merged.model_dump(mode="json")}
    return parse_search_space(raw, str(path))


STARTUP_SAMPLERS = ("tpe", "gp", "cmaes")  # the Optuna samplers with random start-up trials


def _check_combinations(space: SearchSpace, source: str, limit: int = 4096) -> None:
    """Every combination of the dimensions' probe values (grid values, range ends) gives a valid config:
    each value alone can be valid while two together are not (a curriculum start above a sampled target)."""
    probes = {k: d.probe_values() for k, d in space.dimensions.items() if d.kind != "variants"}
    if len(probes) < 2 or math.prod(len(v) for v in probes.values()) > limit:
        return
    for values in itertools.product(*probes.values()):
        combination = dict(zip(probes, values, strict=True))
        try:
            space.base.with_overrides(combination, source="")
        except ConfigError as exc:
            detail = str(exc).removeprefix(": ")
            given = ", ".join(f"{k}={v!r}" for k, v in combination.items() if k.split(".")[-1] in detail)
            raise ConfigError(f"{source}: dimensions {given or combination}: invalid together ({detail})") from None


def _check_selection_split(space: SearchSpace, source: str) -> None:
    """Objectives read the split ``select_on`` names: a test metric is selected on only when the file says
    so, and then the test split is scored at every evaluation (ASHA compares it at every rung)."""
    for objective in space.objectives:
        on_test = objective.metric in SELECTABLE
        if on_test and space.select_on == "val":
            raise ConfigError(f"{source}: objective '{objective.metric}' is measured on the test split; select on "
                              f"'{val_name(objective.metric)}' (the validation split), or say select_on: test")
        if space.select_on == "test" and objective.metric.startswith(VAL_PREFIX):
            raise ConfigError(f"{source}: select_on: test, but objective '{objective.metric}' is measured on the "
                              f"validation split; use '{test_name(objective.metric)}'")
    if space.select_on == "test":
        space.base = space.base.with_overrides({"eval.test_at": "every_eval"}, source="")


def parse_search_space(raw: dict[str, Any], source: str) -> SearchSpace:
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None
    base = space.base
    known = set(known_parameters(base))
    for key, dim in space.dimensions.items():
        if dim.kind == "variants":
            for variant, settings in dim.variants.items():
                try:
                    base.with_overrides(settings, source="")
                except ConfigError as exc:
                    detail = str(exc).removeprefix(": ")
                    raise ConfigError(f"{source}: dimensions.{key}.{variant}: {detail}") from None
            continue
        if key in RENAMED:
            raise ConfigError(f"{source}: dimensions.{key}: renamed to {RENAMED[key][0]} (norm_pix_loss true / false "
                              "is loss.target norm_pix / pixel)")
        if key not in known or key == "seed":
            raise ConfigError(f"{source}: dimensions.{key}: unknown parameter (use seeds: for seeds)")
        for value in dim.probe_values():
            try:
                base.with_overrides({key: value}, source="")
            except ConfigError as exc:
                detail = str(exc).removeprefix(": ")
                raise ConfigError(f"{source}: dimensions.{key}: value {value!r} is invalid ({detail})") from None
    _check_combinations(space, source)
    if space.scheduler.type == "asha" and space.scheduler.max_epochs and space.scheduler.max_epochs > base.epochs:
        raise ConfigError(
            f"{source}: scheduler.max_epochs {space.scheduler.max_epochs} exceeds base epochs {base.epochs}"
        )
    unknown_labels = sorted(set(space.labels) - set(space.dimensions))
    if unknown_labels:
        raise ConfigError(f"{source}: labels.{unknown_labels[0]}: not one of the dimensions "
                          f"({', '.join(space.dimensions) or 'none'})")
    if space.factor is not None and space.factor not in space.dimensions:
        raise ConfigError(f"{source}: factor: '{space.factor}' is not one of the dimensions "
                          f"({', '.join(space.dimensions) or 'none'})")
    per_step = base.batch_size * space.resources.workers
    if base.data.dataset == "synthetic_shapes" and per_step > base.data.num_train:
        raise ConfigError(f"{source}: base.batch_size {base.batch_size} x resources.workers "
                          f"{space.resources.workers} exceeds data.num_train {base.data.num_train}")
    if space.baseline is not None:
        factor = space.ablated_factor
        dim = space.dimensions.get(factor or "")
        if dim is None or dim.kind not in ("grid", "variants") or space.baseline not in dim.values:
            raise ConfigError(f"{source}: baseline: {space.baseline!r} is not a grid value of factor {factor}")
    for i, point in enumerate(space.initial_points):
        if set(point) != set(space.dimensions):
            dims = ", ".join(sorted(space.dimensions))
            raise ConfigError(f"{source}: initial_points[{i}]: must give exactly the dimensions {dims}")
        try:
            base.with_overrides(point, source="")
        except ConfigError as exc:
            raise ConfigError(f"{source}: initial_points[{i}]: {str(exc).removeprefix(': ')}") from None
    if space.initial_points and space.is_grid:
        raise ConfigError(f"{source}: initial_points: only for Optuna searches (a grid runs every value anyway)")
    if space.startup_trials is not None and (space.is_grid or space.sampler not in STARTUP_SAMPLERS):
        raise ConfigError(f"{source}: startup_trials: only for the {', '.join(STARTUP_SAMPLERS)} samplers of an "
                          f"Optuna search (this one is {'a grid' if space.is_grid else space.sampler})")
    _check_selection_split(space, source)
    evaluated = BY_NAME[space.primary.metric].source == "eval"
    every, sched = base.eval.every_epochs, space.scheduler
    rungs_evaluated = sched.grace_period % every == 0 and float(sched.reduction_factor).is_integer()
    if evaluated and sched.type == "asha" and not rungs_evaluated:
        # ASHA compares the metric at epochs grace x factor^k: each must be an evaluation epoch.
        raise ConfigError(
            f"{source}: base.eval.every_epochs {every} must divide scheduler.grace_period {sched.grace_period} "
            f"(and scheduler.reduction_factor be a whole number): ASHA compares '{space.primary.metric}' at "
            "epochs grace_period x reduction_factor^k, each of which must be evaluated"
        )
    for objective in space.objectives:
        variant = BY_NAME[objective.metric].source
        if variant not in ("finetune", "partial_finetune"):
            continue
        at = getattr(base.eval, variant).at
        if at == "never" or (space.scheduler.type == "asha" and at != "every_eval"):
            need = "every_eval (ASHA compares it at every rung)" if space.scheduler.type == "asha" else "end"
            raise ConfigError(f"{source}: base.eval.{variant}.at is '{at}' but the objective '{objective.metric}' "
                              f"needs {need}")
    if not space.is_grid and len(space.seeds) > 1 and not space.seed_averaged:
        raise ConfigError(f"{source}: seeds: an Optuna search runs several seeds per configuration only with "
                          f"seeds_per_trial: {len(space.seeds)} (the trial then reports their mean)")
    return space
