"""The Operation protocol and its registry: what an operation is, declared once, in one module.

An operation (continual, sparsify, ensemble, spectrum, compose, and every later one) is a subclass of
`Operation` in its own module, registered with `@register_operation`. It declares:

- `name`, `aliases` and `help` (the CLI command and its one-line help);
- `section`: its config dataclass (knobs with ranges and choices), registered as `cfg.<section_name>`;
- `run(ctx)`: the experiment — per-seed computation -> rows -> aggregation -> report — returning the
  summary (the runner `fipray.experiments.run_experiment` writes config, timing and environment);
- `brief(summary)`: the one-line JSON the CLI prints;
- `smoke`: the overrides `--smoke-test` adds (tiny steps, one seed); `cli_options`: extra command-line
  flags that set a config key;
- optionally FIP paths (`fipray paths`, the per-path unit in `fipray.units`): `base_data`, `path`,
  `path_steps`;
- optionally sweep trials (`fipray sweep`): `metrics` (the first is the default), `trial`,
  `trial_iterations`, `check_sweep`, `trial_methods` (the baselines a trial can run, `sweep.method`) and
  `validation_context` (the held-out training data a trial scores on, `sweep.validation`).

Everything that dispatches on the operation (the experiment runner, the per-path unit, sweep trials,
config validation, the CLI) looks it up here; no other module lists operation names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from fipray.config import OPERATIONS, SECTIONS, Config, ConfigError
from fipray.path import Phase
from fipray.runtime import RunContext

Report = Callable[[dict[str, Any]], None]


class Operation:
    """Base class of every operation; the optional capabilities raise a ConfigError naming the gap."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    help: ClassVar[str] = ""
    section: ClassVar[type | None] = None
    section_name: ClassVar[str] = ""  # "" : the operation's name
    metrics: ClassVar[tuple[str, ...]] = ()  # what a sweep trial reports; metrics[0] is the default
    smoke: ClassVar[tuple[str, ...]] = ()
    cli_options: ClassVar[tuple[tuple[str, str, str], ...]] = ()  # (flag, config key, help): `--flag V` = key=V
    # Other operations whose config files this command runs as they are (robust: an ensemble config with
    # ensemble.fip: robust); any other file naming another operation is refused by `fipray <name>`.
    runs_configs_of: ClassVar[tuple[str, ...]] = ()

    # The experiment --------------------------------------------------------------------------------
    def context(self, cfg: Config, *, bundle: Any = None, tasks: Any = None, **kwargs: Any) -> RunContext:
        """The run context of this operation (`RunContext.create`): the data of `cfg.data` unless the
        caller gives its own `bundle` (or, for operations that take one, a task stream `tasks`)."""
        if tasks is not None:
            raise ConfigError(f"operation {self.name!r} does not take a task stream (tasks=...)")
        ctx = RunContext.create(cfg, bundle=bundle, **kwargs)
        if bundle is not None:  # the caller's own data: checked against the model before any training
            check_user_data(ctx)
        return ctx

    def train_base(self, ctx: RunContext, model: nn.Module, seed: int) -> None:
        """Train the shared base network w0 of `fipray paths` (default: `base_data` with `train_base`)."""
        from fipray.runtime import train_base

        x, y = self.base_data(ctx, seed)
        train_base(model, x, y, ctx.cfg, seed)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Run the experiment into `ctx.out` (tables, plots, report.md) and return the summary."""
        raise NotImplementedError

    def brief(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The few numbers the CLI prints as JSON after the report."""
        return {}

    # FIP paths (`fipray paths`) --------------------------------------------------------------------
    supports_paths: ClassVar[bool] = False

    def base_data(self, ctx: RunContext, seed: int) -> tuple[Any, Tensor | None]:
        """(inputs, labels) the shared base network w0 trains on, or (Examples, None) (the default:
        `ctx.train_data()`, streamed when `data.stream`)."""
        return ctx.train_data(), None

    def path(self, ctx: RunContext, model: nn.Module, seed: int, *, rank: int = 0,
             world: int = 1) -> tuple[list[Phase], dict[str, Any]]:
        """The phases of one FIP path from `model` (= w0) with `seed`, and extra `run_path` kwargs
        (heldout, evaluate). With `world > 1` rank r uses its own shard of the data."""
        raise ConfigError(f"operation {self.name!r} has no FIP paths to run with `fipray paths`")

    def path_steps(self, cfg: Config) -> int:
        """Optimizer steps of one path (progress displays)."""
        return cfg.path.steps

    # Sweep trials (`fipray sweep`) -----------------------------------------------------------------
    def trial(self, ctx: RunContext, report: Report, **options: Any) -> None:
        """The operation's FIP over `ctx.cfg.seeds`, calling `report(metrics)` once per iteration."""
        raise ConfigError(f"operation {self.name!r} has no sweep trial")

    def trial_iterations(self, cfg: Config) -> int:
        """How many reports a full trial makes (ASHA's max_t)."""
        return len(cfg.seeds)

    def trial_methods(self, cfg: Config) -> tuple[str, ...]:
        """What `sweep.method` may name: FIP, and the baselines this operation's `trial(method=...)` runs (a
        name with `<...>` is a pattern, e.g. `lora_r<rank>`)."""
        return ("fip",)

    def validation_context(self, ctx: RunContext, validation: float, seed: int) -> RunContext:
        """`ctx` with `validation` (a fraction, or a count) of its training split held out as its test split and
        the rest as its training split (stratified, fixed by `seed`): what a sweep trial trains and scores on,
        so selection never reads the test split. ValueError when the split cannot be made."""
        import dataclasses

        from fipray.data.holdout import holdout_bundle

        return dataclasses.replace(ctx, bundle=holdout_bundle(ctx.bundle, validation, seed), memos={})

    def check_sweep(self, cfg: Config) -> None:
        """Checks of a config before any trial starts (raise ConfigError)."""


def check_user_data(ctx: RunContext) -> None:
    """A user's DataBundle against the config's model (`fipray.models.inputs.check_inputs`), on a throwaway network
    (the global RNG untouched)."""
    from fipray.models.inputs import check_inputs

    check_inputs(ctx.bundle, ctx.spec, ctx.model(0))


def collect_seeds(ctx: RunContext, total: int, desc: str, keys: tuple[str, ...],
                  run_seed: Callable[[int], dict[str, list[Any]]]) -> dict[str, list[Any]]:
    """`run_seed(seed)` for every seed under one progress bar of `total` steps, its row lists concatenated."""
    rows: dict[str, list[Any]] = {k: [] for k in keys}
    with ctx.progress(total, desc):
        for seed in ctx.cfg.seeds:
            for k, v in run_seed(seed).items():
                rows[k] += v
    return rows


def check_trial_method(op: Operation, cfg: Config, method: str, where: str = "sweep.method") -> None:
    """ConfigError unless `op`'s sweep trial can run `method` (its `trial_methods`, patterns like `lora_r<rank>`
    matched with a whole number in place of `<rank>`)."""
    import re

    names = op.trial_methods(cfg)
    for name in names:
        pattern = re.sub(r"<[^>]+>", r"\\d+", re.escape(name))
        if re.fullmatch(pattern, method):
            return
    raise ConfigError(f"config key {where!r}: {op.name} sweep trials cannot run {method!r}; they run "
                      f"{', '.join(names)}")


def register_operation(cls: type[Operation]) -> type[Operation]:
    """Class decorator: register an operation under its name and aliases, and its config section."""
    for key in (cls.name, *cls.aliases):
        OPERATIONS.register(key)(cls)
    if cls.section is not None:
        SECTIONS.register(cls.section_name or cls.name)(cls.section)
    return cls


def operation_classes() -> dict[str, type[Operation]]:
    """Every registered operation class by its name (aliases left out), sorted by name."""
    classes = {name: cls for name, cls in OPERATIONS.items() if issubclass(cls, Operation) and cls.name == name}
    return classes


def get_operation(name: str) -> Operation:
    """The registered operation `name` (an instance); an unknown name raises ConfigError listing them."""
    if not name:
        raise ConfigError(f"config key 'operation' is not set; name one of {', '.join(OPERATIONS.names())}")
    try:
        cls: type[Operation] = OPERATIONS.get(name)
        return cls()
    except KeyError as e:
        raise ConfigError(e.args[0]) from None


def unregister_operation(cls: type[Operation]) -> None:
    """Remove an operation and its section (tests that define a toy operation clean up with this)."""
    for key in (cls.name, *cls.aliases):
        OPERATIONS.unregister(key)
    if cls.section is not None:
        SECTIONS.unregister(cls.section_name or cls.name)
