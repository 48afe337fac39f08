"""Typed, frozen run configuration.

One `Config` describes a whole run: the data, the model, how the base network is trained, the
FIP path (distance, λ, β, η, steps), and the operation-specific section. It loads from YAML plus
`key=value` overrides (`path.lam=0.5`, `seeds=[0,1]`), and every unknown key or badly typed value
fails at once with a message that names it and lists what is valid. The run id is a hash of the
non-default fields, so the same config always lands in the same place (open_lth's habit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message says which and what is valid."""


@dataclass(frozen=True)
class DataConfig:
    """Which dataset; `kwargs` go to `fipray.data.get_data(name, **kwargs)`."""

    name: str = "digits"
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    """Which network; `kwargs` go to `fipray.models.create_model(name, **kwargs)`."""

    name: str = "mlp"
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Plain supervised training (the base network w0, baselines, fine-tuning)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0


@dataclass(frozen=True)
class PathConfig:
    """The FIP itself: S = lam * d(f(x_mem; w), f(x_mem; w_anchor)) + beta * L(w).

    `step: penalty` minimises S with the optimizer at rate `lr` (the paper's Algorithms 1-3).
    `step: metric` solves eq. 4 on the sphere ‖dw‖ = `trust_radius` each step with a matrix-free
    Krylov trust-region solver of `cg_iters` g·v products (`fipray.core.step.metric_step`).
    """

    distance: str = "bhattacharyya"
    lam: float = 1.0
    beta: float = 1.0
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    steps: int = 500
    batch_size: int = 64
    memory_batch_size: int = 0  # 0: the whole invariance memory every step
    step: str = "penalty"
    record_every: int = 25
    checkpoint_every: int = 100
    heldout: int = 256  # held-out inputs on which output drift to w0 is recorded
    trust_radius: float = 0.01  # step: metric — the weight distance ‖dw‖ of every step
    cg_iters: int = 10  # step: metric — Krylov dimension (g·v products) of the trust-region solve


@dataclass(frozen=True)
class ContinualConfig:
    """Split-task continual learning (paper Algorithm 1)."""

    num_tasks: int = 5
    classes_per_task: int = 0  # 0: num_classes // num_tasks
    memory_per_task: int = 20
    setting: str = "class"  # the setting summary.json headlines; both are always computed
    baselines: tuple[str, ...] = ("naive", "er", "ewc")
    ewc_lambda: float = 100.0
    ewc_samples: int = 200


@dataclass(frozen=True)
class SparsifyConfig:
    """Path to the p-sparse submanifold (paper Algorithm 2), then a masked invariance phase."""

    targets: tuple[float, ...] = (0.5, 0.8, 0.9)
    exclude_head: bool = False  # the classifier head counts unless this is set (PROTOCOLS.md)
    invariance_steps: int = 200
    baselines: tuple[str, ...] = ("magnitude", "magnitude_ft")


@dataclass(frozen=True)
class EnsembleConfig:
    """Undirected path (L = 0) and member selection (paper Algorithm 3)."""

    members: int = 10
    sample_every: int = 20
    fgsm_eps: float = 0.1
    delta: float = 0.0  # 0: keep the `members` candidates whose outputs move least
    noise: float = 0.02  # per-step random kick, relative to each tensor's RMS (drives the L = 0 walk)
    diversity: bool = False  # add beta * input-gradient coherence with w0 to the path objective
    eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    pgd_steps: int = 20
    eval_examples: int = 300
    autoattack: bool = False  # also run torchattacks' AutoAttack on each deployed model (slow)
    load: str = ""  # an ensemble folder (e.g. `fipray paths`' ensemble/) whose networks replace the walk's samples
    baselines: tuple[str, ...] = ("deep", "base")


@dataclass(frozen=True)
class SpectrumConfig:
    """Spectrum of the metric g at the trained network (`fipray spectrum`), matrix-free."""

    points: int = 256  # N training inputs on which g = JᵀJ / N is taken
    top_k: int = 20
    lanczos_iters: int = 0  # 0: max(3 top_k, top_k + 30)
    slq_probes: int = 4  # stochastic Lanczos quadrature probes for the density (0: skip it)
    slq_iters: int = 40
    thresholds: tuple[float, ...] = (1e-3,)  # report the fraction of eigenvalues below each
    metric: str = "euclidean"  # euclidean: g = JᵀJ on logits; distance: Gauss-Newton of path.distance
    along: str = ""  # a network-set folder (fipray compose): also the spectrum at its nodes
    max_networks: int = 6  # at most this many nodes of `along`, evenly spaced
    precision: str = "float32"  # float64: g·v in double precision, resolves eigenvalues ≪ λ_max·1e-6


@dataclass(frozen=True)
class ComposeConfig:
    """Operations applied in sequence (`fipray compose`), e.g. continual then sparsify and back."""

    orders: tuple[str, ...] = ("continual>sparsify", "sparsify>continual")
    target: float = 0.8  # the sparsify operation's sparsity
    sample_every: int = 0  # also a node every k steps of a phase (0: one node per phase end)


@dataclass(frozen=True)
class Config:
    """A whole fipray run."""

    operation: str = "continual"
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads for the run; 0 keeps torch's default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    path: PathConfig = field(default_factory=PathConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    sparsify: SparsifyConfig = field(default_factory=SparsifyConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def run_id(self) -> str:
        """Hash of the fields that differ from the defaults (stable across key order)."""
        diff = _diff(self.to_dict(), Config().to_dict())
        blob = json.dumps(diff, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted-key overrides applied and validated."""
        return from_dict(_merge(self.to_dict(), _expand(overrides)))


OPERATIONS = ("continual", "sparsify", "ensemble", "undirected", "spectrum", "compose")
CHOICES = {
    ("operation",): OPERATIONS,
    ("path", "step"): ("penalty", "metric"),
    ("path", "optimizer"): ("adam", "adamw", "sgd"),
    ("train", "optimizer"): ("adam", "adamw", "sgd"),
    ("continual", "setting"): ("class", "task"),
    ("spectrum", "metric"): ("euclidean", "distance"),
    ("spectrum", "precision"): ("float32", "float64"),
}
BASELINE_CHOICES = {
    ("continual", "baselines"): ("naive", "er", "ewc"),
    ("sparsify", "baselines"): ("magnitude", "magnitude_ft", "imp"),
    ("ensemble", "baselines"): ("deep", "base"),
}


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _diff(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict) and k not in ("kwargs",):
            sub = _diff(v, b[k])
            if sub:
                out[k] = sub
        elif v != b.get(k):
            out[k] = v
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _expand(flat: dict) -> dict:
    """{'path.lam': 1} -> {'path': {'lam': 1}}; `kwargs` sub-keys stay nested dicts."""
    out: dict = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return out


def _check_value(where: str, value: Any, tp: Any) -> Any:
    """Coerce YAML values to the field's type, or raise naming the field."""
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {where!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {where!r}: expected a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key {where!r}: expected a mapping, got {value!r}")
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where!r}: expected a list, got {value!r}")
        return tuple(_check_value(f"{where}[{i}]", v, inner) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key {where!r}: unsupported union type")
    raise ConfigError(f"config key {where!r}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        where = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], where + ".")
        else:
            kwargs[name] = _check_value(where, data[name], tp)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    plain = cfg.to_dict()
    for keys, allowed in CHOICES.items():
        node: Any = plain
        for k in keys:
            node = node[k]
        if node not in allowed:
            raise ConfigError(f"config key {'.'.join(keys)!r}: {node!r} is not one of {', '.join(allowed)}")
    for keys, allowed in BASELINE_CHOICES.items():
        for b in plain[keys[0]][keys[1]]:
            if b not in allowed:
                raise ConfigError(f"config key {'.'.join(keys)!r}: unknown baseline {b!r}; valid: {', '.join(allowed)}")
    from fipray.core.distances import DISTANCES

    if cfg.path.distance not in DISTANCES:
        raise ConfigError(
            f"config key 'path.distance': {cfg.path.distance!r} is not one of {', '.join(DISTANCES.names())}"
        )
    positive = {
        "train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size, "train.lr": cfg.train.lr,
        "path.lr": cfg.path.lr, "path.batch_size": cfg.path.batch_size, "path.record_every": cfg.path.record_every,
        "path.checkpoint_every": cfg.path.checkpoint_every, "continual.num_tasks": cfg.continual.num_tasks,
        "continual.memory_per_task": cfg.continual.memory_per_task, "ensemble.members": cfg.ensemble.members,
        "ensemble.sample_every": cfg.ensemble.sample_every, "ensemble.pgd_steps": cfg.ensemble.pgd_steps,
        "continual.ewc_samples": cfg.continual.ewc_samples, "ensemble.eval_examples": cfg.ensemble.eval_examples,
        "path.trust_radius": cfg.path.trust_radius, "path.cg_iters": cfg.path.cg_iters,
    }
    for k, v in positive.items():
        if not v > 0:
            raise ConfigError(f"config key {k!r} must be > 0, got {v!r}")
    nonneg = {"path.steps": cfg.path.steps, "path.lam": cfg.path.lam, "path.beta": cfg.path.beta,
              "train.weight_decay": cfg.train.weight_decay, "path.weight_decay": cfg.path.weight_decay,
              "continual.ewc_lambda": cfg.continual.ewc_lambda, "ensemble.noise": cfg.ensemble.noise,
              "ensemble.fgsm_eps": cfg.ensemble.fgsm_eps, "ensemble.delta": cfg.ensemble.delta,
              "path.memory_batch_size": cfg.path.memory_batch_size, "path.heldout": cfg.path.heldout,
              "sparsify.invariance_steps": cfg.sparsify.invariance_steps}
    for k, v in nonneg.items():
        if not v >= 0:  # also rejects NaN
            raise ConfigError(f"config key {k!r} must be >= 0, got {v!r}")
    for p in cfg.sparsify.targets:
        if not 0.0 < p < 1.0:
            raise ConfigError(f"config key 'sparsify.targets': {p!r} must be a fraction in (0, 1)")
    if not cfg.ensemble.eps:
        raise ConfigError("config key 'ensemble.eps' must list at least one radius")
    for e in cfg.ensemble.eps:
        if e < 0:
            raise ConfigError(f"config key 'ensemble.eps': {e!r} must be >= 0")
    for k, v in {"spectrum.points": cfg.spectrum.points, "spectrum.top_k": cfg.spectrum.top_k,
                 "spectrum.slq_iters": cfg.spectrum.slq_iters, "spectrum.max_networks": cfg.spectrum.max_networks,
                 }.items():
        if not v > 0:
            raise ConfigError(f"config key {k!r} must be > 0, got {v!r}")
    for k, v in {"spectrum.lanczos_iters": cfg.spectrum.lanczos_iters, "spectrum.slq_probes": cfg.spectrum.slq_probes,
                 "compose.sample_every": cfg.compose.sample_every}.items():
        if not v >= 0:
            raise ConfigError(f"config key {k!r} must be >= 0, got {v!r}")
    if not 0.0 < cfg.compose.target < 1.0:
        raise ConfigError(f"config key 'compose.target': {cfg.compose.target!r} must be a fraction in (0, 1)")
    for o in cfg.compose.orders:
        ops = o.split(">")
        if not all(op in ("continual", "sparsify") for op in ops):
            raise ConfigError(f"config key 'compose.orders': {o!r} must chain continual and sparsify with '>' "
                              "(e.g. continual>sparsify)")
    if not cfg.compose.orders:
        raise ConfigError("config key 'compose.orders' must list at least one order")
    if cfg.threads < 0:
        raise ConfigError(f"config key 'threads' must be >= 0, got {cfg.threads}")
    if not cfg.seeds:
        raise ConfigError("config key 'seeds' must list at least one seed")


def from_dict(data: dict) -> Config:
    """Build and validate a Config from a nested mapping."""
    cfg = _build(Config, data or {}, "")
    _validate(cfg)
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


def read_yaml_mapping(path: str | Path | None) -> dict:
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
    return from_dict(_merge(data, _expand(over)))


def save_config(cfg: Config, path: str | Path) -> None:
    from fipray._io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
