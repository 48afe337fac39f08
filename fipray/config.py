"""Typed, frozen run configuration: one system for every section.

One `Config` describes a whole run: the data, the model, how the base network is trained, the
FIP path (distance, λ, β, η, steps), and one section per registered operation (`continual`,
`sparsify`, ... — each operation module declares its own dataclass, see `fipray.operation`).
The Ray, sweep and serve sections (`fipray.job`, `fipray.serving`) are dataclasses built and
validated by the same `build_section`.

Every field is a `knob`: its type, range and valid choices sit next to it, so a bad value fails at
once with one error type (`ConfigError`) naming the key and what is valid. Configs load from YAML
plus `key=value` overrides (`path.lam=0.5`, `seeds=[0,1]`). The run id is a hash of the non-default
fields, so the same config always lands in the same place (open_lth's habit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fipray.registry import Registry


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message says which and what is valid."""


Choices = tuple[str, ...] | Callable[[], list[str]]


def knob(default: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
         choices: Choices | None = None, nonempty: bool = False) -> Any:
    """A config field with its constraints beside it.

    Args:
        default: the default value (a dict default is copied per instance).
        gt, ge, lt: bounds on a number (on every element of a tuple of numbers).
        choices: the valid strings, or a callable returning them (a registry's `names`), checked
            on the value or on every element of a tuple.
        nonempty: a tuple field must hold at least one element.
    """
    meta = {"gt": gt, "ge": ge, "lt": lt, "choices": choices, "nonempty": nonempty}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def _distances() -> list[str]:
    from fipray.core.distances import DISTANCES

    return DISTANCES.names()


def _optimizers() -> list[str]:
    from fipray.optim import OPTIMIZERS

    return OPTIMIZERS.names()


@dataclass(frozen=True)
class DataConfig:
    """Which dataset; `kwargs` go to `fipray.data.get_data(name, **kwargs)`."""

    name: str = "digits"
    kwargs: dict[str, Any] = knob({})
    # stream: training batches are loaded from the dataset by a DataLoader as needed (workers, pinned
    # memory on CUDA) instead of from whole-dataset tensors; batch t stays a pure function of (seed, t).
    stream: bool = False
    workers: int = knob(0, ge=0)  # DataLoader worker processes of a streamed run
    # torchvision v2 transforms as [{Name: {kwarg: value}}, ...]: train ones (augmentation) need stream.
    train_transforms: tuple[dict[str, Any], ...] = ()
    eval_transforms: tuple[dict[str, Any], ...] = ()
    # engine: "local" reads the dataset in the process that trains (the loaders; URIs through the node cache);
    # "ray" reads a Ray-backed run's training split with Ray Data (`fipray paths` with ray.backend: train).
    engine: str = knob("local", choices=("local", "ray"))
    # where remote dataset files (s3://, gs://) are cached on each node; default $FIPRAY_CACHE_DIR or
    # ~/.cache/fipray/uri ("" = that default)
    cache_dir: str = ""
    # evaluation reads the test split in batches of this many examples (streamed: no whole-split tensors)
    eval_batch_size: int = knob(512, gt=0)

    def check(self) -> None:
        from fipray.data.stream import build_transform

        if self.train_transforms and not self.stream:
            raise ConfigError("config key 'data.train_transforms' needs data.stream: true (random augmentation "
                              "is drawn per item as batches are loaded)")
        for key in ("train_transforms", "eval_transforms"):
            try:
                build_transform(getattr(self, key))
            except ValueError as e:
                raise ConfigError(f"config key 'data.{key}': {e}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Which network; `kwargs` go to `fipray.models.create_model(name, **kwargs)`."""

    name: str = "mlp"
    kwargs: dict[str, Any] = knob({})


@dataclass(frozen=True)
class TrainConfig:
    """Plain supervised training (the base network w0, baselines, fine-tuning)."""

    steps: int = knob(1000, gt=0)
    batch_size: int = knob(64, gt=0)
    lr: float = knob(1e-3, gt=0)
    optimizer: str = knob("adam", choices=_optimizers)
    weight_decay: float = knob(0.0, ge=0)
    precision: str = knob("fp32", choices=("fp32", "bf16", "fp16"))  # autocast dtype; losses stay float32
    accumulate: int = knob(1, ge=1)  # micro-batches per step (same batch, 1/accumulate of the activations)


@dataclass(frozen=True)
class PathConfig:
    """The FIP itself: S = lam * d(f(x_mem; w), f(x_mem; w_anchor)) + beta * L(w).

    `step: penalty` minimises S with the optimizer at rate `lr` (the paper's Algorithms 1-3).
    `step: metric` solves eq. 4 on the sphere ‖dw‖ = `trust_radius` each step with a matrix-free
    Krylov trust-region solver of `cg_iters` g·v products (`fipray.core.step.metric_step`).
    """

    distance: str = knob("bhattacharyya", choices=_distances)
    lam: float = knob(1.0, ge=0)
    beta: float = knob(1.0, ge=0)
    lr: float = knob(1e-3, gt=0)
    optimizer: str = knob("adam", choices=_optimizers)
    weight_decay: float = knob(0.0, ge=0)
    steps: int = knob(500, ge=0)
    batch_size: int = knob(64, gt=0)
    memory_batch_size: int = knob(0, ge=0)  # 0: the whole invariance memory every step
    step: str = knob("penalty", choices=("penalty", "metric"))
    record_every: int = knob(25, gt=0)
    checkpoint_every: int = knob(100, gt=0)
    # checkpoints a path folder keeps (checkpoint.pt the newest): a damaged one is moved aside as *.corrupt and
    # the path resumes from the one before
    keep_checkpoints: int = knob(2, ge=1, lt=101)
    heldout: int = knob(256, ge=0)  # held-out inputs on which output drift to w0 is recorded
    trust_radius: float = knob(0.01, gt=0)  # step: metric — the weight distance ‖dw‖ of every step
    cg_iters: int = knob(10, gt=0)  # step: metric — Krylov dimension (g·v products) of the trust-region solve
    # FIP phases update the eval-mode network by default (BatchNorm running statistics fixed, dropout
    # off): the function kept invariant is the one deployed. True: updates in train mode; the memory's
    # outputs (the invariance term) are still taken in eval mode. Base training and baselines always
    # train in train mode.
    train_mode: bool = False
    precision: str = knob("fp32", choices=("fp32", "bf16", "fp16"))  # penalty step; the metric step stays fp32
    accumulate: int = knob(1, ge=1)  # penalty step: micro-batches of the new batch and memory batch per step

    def check(self, cfg: Config) -> None:
        """`steps: 0` is refused where the operation's paths would take no step (and report their starting
        network as if it had moved). An operation class may say when its paths do not count in path.steps
        (`uses_path_steps(cfg) -> bool`); otherwise a section knob `epochs` > 0 (task lengths in passes over
        the data) does."""
        if self.steps or not cfg.operation or cfg.operation not in OPERATIONS:
            return
        op = OPERATIONS.get(cfg.operation)
        uses = getattr(op(), "uses_path_steps", None)
        if callable(uses):
            needed = bool(uses(cfg))
        else:
            section = cfg.sections.get(getattr(op, "section_name", "") or getattr(op, "name", cfg.operation))
            needed = not getattr(section, "epochs", 0)
        if needed:
            raise ConfigError(f"config key 'path.steps' is 0: every {cfg.operation} path would stop where it "
                              f"starts and report that network as its result; give path.steps > 0")


# The two plugin registries the config validates against, filled by `fipray.operation.register_operation`:
# operation sections (`continual:`, `sparsify:`, ...: each operation module registers its dataclass) and the
# operation classes themselves (typed `type` here: the `Operation` base class lives on the floor above).
SECTIONS: Registry[type] = Registry("config section", builtins="fipray.ops")
OPERATIONS: Registry[type] = Registry("operation", builtins="fipray.ops")


def _default_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in SECTIONS.items()}


CORE_FIELDS = ("operation", "seeds", "device", "threads", "data", "model", "train", "path")


@dataclass(frozen=True)
class Config:
    """A whole fipray run: the core fields plus one section per registered operation (`cfg.continual`)."""

    operation: str = ""  # a registered operation (`fipray <operation>` sets it); "" only in the bare defaults
    seeds: tuple[int, ...] = knob((0,), nonempty=True)
    device: str = "cpu"
    threads: int = knob(0, ge=0)  # torch intra-op threads for the run; 0 keeps torch's default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    path: PathConfig = field(default_factory=PathConfig)
    sections: Mapping[str, Any] = field(default_factory=_default_sections, hash=False)

    def __getattr__(self, name: str) -> Any:
        # Only reached when ordinary lookup fails: `cfg.continual` is the registered section.
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"Config has no field or section {name!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {name: _to_plain(dataclasses.asdict(getattr(self, name)) if dataclasses.is_dataclass(
            getattr(self, name)) else getattr(self, name)) for name in CORE_FIELDS}
        out.update({name: _to_plain(dataclasses.asdict(sec)) for name, sec in self.sections.items()})
        return out

    def run_id(self) -> str:
        """Hash of the fields that differ from the defaults (stable across key order)."""
        diff = _diff(self.to_dict(), Config().to_dict())
        blob = json.dumps(diff, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted-key overrides applied and validated."""
        return from_dict(merge(self.to_dict(), expand(overrides)))


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict) and k not in ("kwargs",):
            sub = _diff(v, b[k])
            if sub:
                out[k] = sub
        elif v != b.get(k):
            out[k] = v
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid onto `base`, section by section (`kwargs` mappings are replaced whole)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def expand(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'path.lam': 1} -> {'path': {'lam': 1}}; `kwargs` sub-keys stay nested dicts."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return out


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML value to the field's type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {where!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {where!r}: expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key {where!r}: expected a number, got {value!r}")
        if not math.isfinite(number):  # inf / nan would turn a path to NaN silently, steps later
            raise ConfigError(f"config key {where!r}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {where!r}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key {where!r}: expected a mapping, got {value!r}")
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where!r}: expected a list, got {value!r}")
        return tuple(_check_type(f"{where}[{i}]", v, inner) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key {where!r}: unsupported union type")
    raise ConfigError(f"config key {where!r}: unsupported type {tp}")


def _check_constraints(where: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Range and choice constraints of a knob, on the value or on each element of a tuple."""
    if meta.get("nonempty") and isinstance(value, tuple) and not value:
        raise ConfigError(f"config key {where!r} must list at least one value")
    items = value if isinstance(value, tuple) else (value,)
    choices = meta.get("choices")
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        for v in items:
            if v not in allowed:
                raise ConfigError(f"config key {where!r}: {v!r} is not one of {', '.join(allowed)}")
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        bad = math.isnan(v)
        bounds = []
        for key, op, text in (("gt", float.__gt__, ">"), ("ge", float.__ge__, ">="), ("lt", float.__lt__, "<")):
            b = meta.get(key)
            if b is not None:
                bounds.append(f"{text} {b:g}")
                bad = bad or not op(float(v), float(b))
        if bad:
            raise ConfigError(f"config key {where!r} must be {' and '.join(bounds)}, got {v!r}")


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """A validated instance of the dataclass `cls` from a mapping; `prefix` names it in errors ('path.')."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + str(unknown[0])!r}; valid keys here: {', '.join(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name in fields:
        tp, where = hints[name], prefix + name
        if name in data:
            kwargs[name] = (build_section(typing.cast(type, tp), data[name], where + ".") if dataclasses.is_dataclass(tp)
                            else _check_type(where, data[name], tp))
    obj = cls(**kwargs)
    for name, f in fields.items():
        _check_constraints(prefix + name, getattr(obj, name), f.metadata)
    return obj


def from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build and validate a Config from a nested mapping."""
    data = dict(data or {})
    names = dict(SECTIONS.items())
    core = {k: v for k, v in data.items() if k not in names}
    unknown = [k for k in core if k not in CORE_FIELDS]
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; valid keys here: "
                          f"{', '.join([*CORE_FIELDS, *names])}")
    sections = {name: build_section(cls, data.get(name, {}) or {}, f"{name}.") for name, cls in names.items()}
    cfg: Config = build_section(Config, core, "")
    cfg = dataclasses.replace(cfg, sections=sections)
    if cfg.operation and cfg.operation not in OPERATIONS:
        raise ConfigError(f"config key 'operation': {cfg.operation!r} is not one of {', '.join(OPERATIONS.names())}")
    cfg.data.check()
    cfg.path.check(cfg)
    for sec in sections.values():
        check = getattr(sec, "check", None)
        if check is not None:  # cross-field checks a section declares (they may read other sections)
            check(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """'path.lam=0.5' -> ('path.lam', 0.5), values parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. path.lam=0.5)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.strip(), value


def read_yaml_mapping(path: str | Path | None) -> dict[str, Any]:
    """The top-level mapping of a YAML config file ({} for None), or a ConfigError naming the file."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config and apply `key=value` overrides."""
    data = read_yaml_mapping(path)
    over = dict(parse_override(o) for o in overrides)
    return from_dict(merge(data, expand(over)))


def save_config(cfg: Config, path: str | Path) -> None:
    from fipray.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
