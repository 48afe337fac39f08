"""The continual operation's config section, its task stream and tasks, and each method's own config.

`ContinualConfig` (`continual:` in a config) describes the stream (class split, datasets, or one dataset
under per-task transforms), the head, the replay memory (a stratified sample per task, or one reservoir
buffer over the whole stream as the DER paper keeps it), how long each task lasts (`path.steps`, or
`epochs` passes over its data), which baselines run, and per-method overrides of any path or baseline
knob (`overrides: {derpp: {path.lr: 0.1, continual.der_alpha: 1.0}}`: the published hyperparameters
of each method, or each method's own tuned ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from fipray.baselines.continual import CONTINUAL_BASELINES
from fipray.config import Config, ConfigError, from_dict, knob, merge
from fipray.data import get_data, streams
from fipray.data.memory import TaskTensors, materialise
from fipray.data.stream import Examples, StreamedExamples, build_transform
from fipray.data.streams import TaskStream
from fipray.heads import LAYOUTS, Head
from fipray.runtime import load_bundle

# What a method's overrides may change: its optimisation and its own knobs, never the stream or the data.
OVERRIDABLE = ("path.", "continual.der_alpha", "continual.der_beta", "continual.er_replay", "continual.ewc_",
               "continual.lwf_", "continual.lora.")
# Methods that can learn task 0 themselves (`base: each`): those whose phases make sense on the first task.
OWN_FIRST_TASK = ("fip", "naive", "er", "der", "derpp", "fip_stored", "joint")


@dataclass(frozen=True)
class LoraOptions:
    """The LoRA baseline (peft): one method per rank (`lora_r8`, ...); adapters merged after each task."""

    ranks: tuple[int, ...] = knob((8,), gt=0, nonempty=True)
    alpha: float = knob(0.0, ge=0)  # LoRA's alpha; 0: 2 x rank
    dropout: float = knob(0.0, ge=0, lt=1)
    # peft target_modules: module-name suffixes; (): query/value projections of a transformer, every
    # Linear layer but the output head otherwise. The head always trains (peft modules_to_save).
    targets: tuple[str, ...] = knob(())
    lr: float = knob(0.0, ge=0)  # 0: path.lr


@dataclass(frozen=True)
class ContinualConfig:
    """Continual learning on a task stream (paper Algorithm 1)."""

    stream: str = knob("split", choices=("split", "datasets", "domain"))
    head: str = knob("shared", choices=LAYOUTS)
    num_tasks: int = knob(5, gt=0)  # split and domain streams; a datasets stream has one task per entry of `tasks`
    classes_per_task: int = knob(0, ge=0)  # 0: num_classes // num_tasks
    tasks: tuple[dict, ...] = knob(())  # datasets stream: [{name, kwargs}] per task, as the `data` section
    domain: str = knob("permute", choices=("permute", "rotate"))  # domain stream: the per-task transform
    domain_seed: int = knob(0, ge=0)
    rotate_degrees: float = knob(15.0)  # rotate: task i turned by i x rotate_degrees (task 0 upright) ...
    rotate_range: tuple[float, ...] = knob(())  # ... or [low, high]: one angle per task drawn from [low, high)
    identity_first: bool = True  # domain streams: task 0 sees the original inputs (False: every task transformed)
    memory: str = knob("per_task", choices=("per_task", "reservoir"))  # replay memory (see the module docstring)
    memory_per_task: int = knob(20, gt=0)  # per_task: a stratified sample of each task's training examples
    buffer_size: int = knob(200, gt=0)  # reservoir: one buffer over the whole stream
    epochs: int = knob(0, ge=0)  # > 0: each task lasts this many passes over its training data (not path.steps)
    er_replay: str = knob("sum", choices=("sum", "concat"))  # ER: CE(new) + CE(replay), or one CE over both
    setting: str = knob("class", choices=("class", "task"))  # the setting summary.json headlines; both computed
    # task 0: train the base network on it, take the network as it is, or (each) every baseline learns task 0
    # itself from the untrained network with its own rule, FIP's path starting from the base trained by `train`
    base: str = knob("train", choices=("train", "as_is", "each"))
    base_weights: str = ""  # a state dict (.safetensors/.pt) loaded into the network before task 0
    baselines: tuple[str, ...] = knob(("naive", "er", "ewc"), choices=CONTINUAL_BASELINES.names)
    ewc_lambda: float = knob(100.0, ge=0)
    ewc_samples: int = knob(200, gt=0)
    lwf_lambda: float = knob(1.0, ge=0)
    lwf_temperature: float = knob(2.0, gt=0)
    der_alpha: float = knob(0.3, ge=0)  # DER++: weight of the logit-matching term
    der_beta: float = knob(0.5, ge=0)  # DER++: weight of the replayed labels' cross-entropy
    lora: LoraOptions = field(default_factory=LoraOptions)
    pca_coordinates: int = knob(100_000, gt=0)  # weight-space PCA: a seeded subset of this many coordinates
    overrides: dict = field(default_factory=dict)  # method -> {dotted config key: value} for that method only

    def check(self, cfg: Config) -> None:
        if cfg.operation != "continual":
            return
        self._check_protocol(cfg)
        if self.stream == "datasets":
            if not self.tasks:
                raise ConfigError("config key 'continual.tasks': a datasets stream needs one entry per task "
                                  "({name, kwargs}, like the data section)")
            for i, t in enumerate(self.tasks):
                bad = sorted(set(t) - {"name", "kwargs"})
                if "name" not in t or bad:
                    raise ConfigError(f"config key 'continual.tasks[{i}]': give name and optional kwargs"
                                      f"{', not ' + ', '.join(bad) if bad else ''}")
            if self.head == "shared":
                raise ConfigError("config key 'continual.head': 'shared' needs one label space; the tasks of a "
                                  "datasets stream have their own, use 'multi', 'grow' or 'union'")
        elif self.tasks:
            raise ConfigError(f"config key 'continual.tasks' lists datasets, but continual.stream is "
                              f"{self.stream!r} (set stream: datasets)")


    def _check_protocol(self, cfg: Config) -> None:
        """The memory, task-length, first-task and override knobs, checked together."""
        methods = methods_of(cfg)
        if self.base == "each":
            bad = [m for m in methods if m.split("_r")[0] not in OWN_FIRST_TASK]
            if bad:
                raise ConfigError(f"config key 'continual.base': 'each' (every method learns task 0 itself) "
                                  f"supports {', '.join(OWN_FIRST_TASK)}; not {', '.join(bad)}")
        if "fip_stored" in self.baselines and self.memory != "reservoir":
            raise ConfigError("config key 'continual.baselines': fip_stored anchors on a reservoir buffer; set "
                              "continual.memory: reservoir")
        if self.rotate_range and (len(self.rotate_range) != 2 or not self.rotate_range[0] < self.rotate_range[1]):
            raise ConfigError(f"config key 'continual.rotate_range': give [low, high] degrees with low < high, "
                              f"got {list(self.rotate_range)}")
        if self.rotate_range and (self.stream != "domain" or self.domain != "rotate"):
            raise ConfigError("config key 'continual.rotate_range' applies to stream: domain with domain: rotate")
        # A method the run leaves out may keep its overrides (`continual.baselines=[]` on the command line);
        # a name that is no method at all is a typo.
        known = {"fip", *CONTINUAL_BASELINES.names()}
        unknown = sorted(m for m in self.overrides if m not in known and not re.fullmatch(r"lora_r\d+", m))
        if unknown:
            raise ConfigError(f"config key 'continual.overrides': {unknown[0]!r} is not a method (fip, "
                              f"{', '.join(CONTINUAL_BASELINES.names())}, lora_r<rank>)")
        for m in self.overrides:
            method_config(cfg, m)


def num_tasks(cfg: Config) -> int:
    cc = cfg.continual
    return len(cc.tasks) if cc.stream == "datasets" else cc.num_tasks


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def method_config(cfg: Config, method: str) -> Config:
    """The config `method` runs with: `cfg` with `continual.overrides[method]` applied (a ConfigError names
    a key that is not a config key, or not one a method may override)."""
    over = cfg.continual.overrides.get(method)
    if not over:
        return cfg
    flat = _flat(over)
    for key in flat:
        if not key.startswith(OVERRIDABLE):
            raise ConfigError(f"config key 'continual.overrides.{method}': {key!r} cannot differ between methods "
                              f"(allowed: {', '.join(k.rstrip('.') + ('*' if k.endswith(('.', '_')) else '') for k in OVERRIDABLE)})")
    data = cfg.to_dict()
    data["continual"] = {**data["continual"], "overrides": {}}
    for key, value in flat.items():
        section, _, rest = key.partition(".")
        node = data[section]
        *parents, leaf = rest.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return from_dict(merge({}, data))
    except ConfigError as e:
        raise ConfigError(f"config key 'continual.overrides.{method}': {e}") from None


def methods_of(cfg: Config) -> list[str]:
    """FIP, then the baselines; `lora` is one method per rank (`lora_r8`, ...)."""
    out = ["fip"]
    for b in cfg.continual.baselines:
        out += [f"lora_r{r}" for r in cfg.continual.lora.ranks] if b == "lora" else [b]
    return out


def stream_from_config(cfg: Config, bundle: Any = None) -> TaskStream:
    """The task stream `cfg.continual` describes (`bundle`: the data of a split or domain stream; None
    loads `cfg.data`)."""
    cc = cfg.continual
    if cc.stream == "datasets":
        bundles = []
        for i, t in enumerate(cc.tasks):
            try:
                bundles.append(get_data(t["name"], **dict(t.get("kwargs") or {})))
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"config key 'continual.tasks[{i}]': {e.args[0] if e.args else e}") from None
        try:
            return streams.datasets_stream(bundles)
        except ValueError as e:
            raise ConfigError(f"config key 'continual.tasks': {e}") from None
    bundle = bundle if bundle is not None else load_bundle(cfg)
    if cc.stream == "domain":
        if cc.domain == "permute":
            tfs = streams.permutations(cc.num_tasks, bundle.input_shape, cc.domain_seed, cc.identity_first)
        elif cc.rotate_range:
            low, high = cc.rotate_range[0], cc.rotate_range[1]
            tfs = streams.random_rotations(cc.num_tasks, low, high, seed=cc.domain_seed,
                                           identity_first=cc.identity_first)
        else:
            tfs = streams.rotations(cc.num_tasks, cc.rotate_degrees)
        names = [f"{cc.domain} {i}" if tf is not None else "original" for i, tf in enumerate(tfs)]
        return streams.domain_stream(bundle, tfs, names)
    try:
        return streams.class_split(bundle, cc.num_tasks, classes_per_task=cc.classes_per_task or None)
    except ValueError as e:
        raise ConfigError(f"config section 'continual': {e}") from None


def make_head(layout: str, stream: TaskStream) -> tuple[Head, list[dict[int, int]]]:
    try:
        return Head.build(layout, [t.classes for t in stream.tasks], stream.shared_labels, stream.num_labels)
    except ValueError as e:
        raise ConfigError(f"config key 'continual.head': {e}") from None


def build_tasks(cfg: Config, bundle: Any, device: torch.device, seed: int, *, stream: TaskStream | None = None,
                head: Head | None = None, columns: list[dict[int, int]] | None = None,
                test_cache: dict | None = None) -> list[TaskTensors]:
    """The tasks of a stream (default: the one `cfg.continual` describes over `bundle`) with their replay
    memories, labels mapped to the head's output columns (`fipray.data.memory.materialise`)."""
    cc, d = cfg.continual, cfg.data
    if stream is None:
        stream = stream_from_config(cfg, bundle)
    if head is None or columns is None:
        head, columns = make_head(cc.head, stream)
    for i, t in enumerate(stream.tasks):
        n = len(t.train)  # type: ignore[arg-type]
        if cc.memory_per_task > n:
            raise ConfigError(f"config key 'continual.memory_per_task': {cc.memory_per_task} "
                              f"exceeds the {n} training examples of task {i}")

    def streamed(dataset: Dataset) -> Examples:
        return StreamedExamples(dataset, device, workers=d.workers, train_transform=build_transform(d.train_transforms),
                                eval_transform=build_transform(d.eval_transforms))

    return materialise(stream, head, columns, device, seed, cc.memory_per_task,
                       streamed=streamed if d.stream else None, test_cache=test_cache)
