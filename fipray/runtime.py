"""The public runtime every operation, unit and command builds on.

Device, data loading, model building, base training (and networks trained like w0), the DDP shard rule, the
output folder, progress, result files, and `RunContext` (what an operation's run gets: config, device, data, model
spec, output folder, progress). Nothing here knows which operations exist; it imports only the layers below it.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from fipray.atomic import atomic_write_json, atomic_write_text, write_parquet
from fipray.config import Config, ConfigError, save_config
from fipray.data.batches import mix_seed
from fipray.eval.split import EvalSplit
from fipray.path import PathResult, run_path
from fipray.phases import supervised_phase

T = TypeVar("T")


def device_of(cfg: Config) -> torch.device:
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {cfg.device!r} requested but CUDA is not available")
    return dev


def load_bundle(cfg: Config):
    """The config's dataset; files named by URIs are fetched into `data.cache_dir` (default: the node cache)."""
    from fipray.data import get_data
    from fipray.uri import using_cache_dir

    try:
        with using_cache_dir(cfg.data.cache_dir):
            return get_data(cfg.data.name, **cfg.data.kwargs)
    except (KeyError, TypeError, ValueError) as e:  # unknown name/option, bad column or split, bad URI
        raise ConfigError(f"config section 'data': {e.args[0] if e.args else e}") from None


def model_spec(cfg: Config, bundle: Any) -> dict:
    return {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs),
            "num_classes": int(bundle.num_classes), "input_shape": list(bundle.input_shape)}


def build_model(spec: dict, seed: int, device: torch.device) -> nn.Module:
    """A fresh network; its initialisation depends only on `seed` (global RNG untouched)."""
    from fipray.models import model_from_spec

    try:
        return model_from_spec(spec, seed, device)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"config section 'model': {e.args[0] if e.args else e}") from None


def tensors(ds: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    from fipray.data import as_tensors

    x, y = as_tensors(ds)
    return x.to(device), y.to(device).long()


def train_base(model: nn.Module, x: Any, y: Tensor | None, cfg: Config, seed: int, name: str = "base",
               progress: Any = None, out_dir: Path | None = None) -> PathResult:
    """Plain supervised training (the network w0 every path starts from).

    `x, y` are tensors, or `x` is `fipray.data.stream.Examples` (e.g. `RunContext.train_data()`) and y None.
    With `out_dir` (`RunContext.base_dir(seed)`) the training checkpoints there like a path
    (`base_checkpoints`): an interrupted run resumes it, a finished one is loaded, not trained again.
    """
    return run_path(model, [supervised_phase(name, x, y, cfg.train, seed)], out_dir=out_dir,
                    record_every=max(cfg.train.steps, 1), progress=progress, **base_checkpoints(cfg, out_dir))


def base_checkpoints(cfg: Config, out_dir: Path | None) -> dict:
    """`run_path` checkpoint arguments of a base network's training into `out_dir`: every
    `path.checkpoint_every` steps there (and at its end), none without a folder. The weights are the same
    either way (checkpoints only read the state)."""
    if out_dir is None:
        return {"checkpoint_every": 10**9}
    return {"checkpoint_every": cfg.path.checkpoint_every, "keep_checkpoints": cfg.path.keep_checkpoints}


def trained_like_w0(ctx: RunContext, seed: int, tag: int, count: int,
                    train: Callable[[nn.Module, int], Any] | None = None) -> list[nn.Module]:
    """`count` networks trained like w0 (`train(model, seed)`, default `train_base` on the training split),
    member k from seed mix_seed(seed, tag, k) (its initialisation and batch order); in eval mode."""
    members = []
    for k in range(count):
        ms = mix_seed(seed, tag, k)
        m = ctx.model(ms)
        if train is None:
            train_base(m, ctx.train_data(), None, ctx.cfg, ms, progress=ctx.bar)
        else:
            train(m, ms)
        members.append(m.eval())
    return members


def load_weights(model: nn.Module, file: str, key: str) -> None:
    """Load the state dict in `file` (.safetensors, or a torch file read with weights_only; `cached:<set>/<file>`
    names a verified file of the data cache) into `model`; a ConfigError naming config key `key` when the file is
    missing or does not fit."""
    from fipray.data.cache import resolve_cached_file
    from fipray.models.registry import load_state_dict_file

    try:
        path = resolve_cached_file(file).expanduser()
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key '{key}': {e}") from None
    if not path.is_file():
        raise ConfigError(f"config key '{key}': {file!r} is not a file")
    try:
        model.load_state_dict(load_state_dict_file(path))
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"config key '{key}': {file!r} does not fit the model: {str(e).splitlines()[0]}") from None


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def ensure_writable(folder: Path, what: str) -> None:
    """Create `folder` and prove it can be written, or raise a ConfigError naming it as `what`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {str(folder)!r} cannot be written: {e}") from None


def prepare_out(cfg: Config, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    ensure_writable(out, "output folder")
    save_config(cfg, out / "config.yaml")
    return out


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def write_outputs(out: Path, cfg: Config, summary: dict, tables: dict[str, list[dict]], report: str) -> None:
    for name, rows in tables.items():
        if rows:
            write_parquet(out / f"{name}.parquet", rows)
    summary = {**summary, "run_id": cfg.run_id(), "environment": environment()}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", report)


def path_summary(records: list[dict]) -> dict:
    """PROTOCOLS.md path numbers from a path's records: FIP length (summed over every step by `run_path`),
    straight distance, mean drift."""
    if not records:
        return {}
    drift = [r["heldout_distance"] for r in records if "heldout_distance" in r]
    return {"fip_length": records[-1]["fip_length"], "straight_distance": records[-1]["weight_distance"],
            "heldout_distance_mean": float(sum(drift) / len(drift)) if drift else float("nan")}


def shard(*tensors: Tensor | None, rank: int, world: int, streamed: bool = False) -> tuple[Tensor, ...]:
    """Every `world`-th row from `rank` of each tensor: the one rule by which a path's DDP ranks
    (`ray.workers_per_path > 1`) split in-memory data. Streamed data (or a missing tensor) cannot be
    split this way: a ConfigError says so."""
    if world <= 1:
        return typing.cast(tuple[Tensor, ...], tensors)
    if streamed or any(t is None for t in tensors):
        raise ConfigError("ray.workers_per_path > 1 (DDP) shards in-memory data; data.stream: true is not "
                          "supported there yet")
    return tuple(typing.cast(Tensor, t)[rank::world] for t in tensors)


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


@dataclass
class RunContext:
    """What an operation's run works with.

    Attributes:
        cfg: the validated config.
        device: where tensors and models live.
        bundle: the `fipray.data.DataBundle` (the user's own, or `cfg.data` through the registry).
        spec: the model spec (`model_spec`): name, kwargs, classes, input shape.
        out: the output folder (None: nothing is written, e.g. in a sweep trial).
        show_progress: whether `progress(...)` shows a bar.
        bar: the open progress bar (tqdm-like: update(n), set_postfix), or None.
    """

    cfg: Config
    device: torch.device
    bundle: Any
    spec: dict
    out: Path | None = None
    show_progress: bool = False
    bar: Any = None
    memos: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, cfg: Config, *, bundle: Any = None, out: Path | None = None, show_progress: bool = False,
               device: str | torch.device | None = None) -> RunContext:
        dev = torch.device(device) if device is not None else device_of(cfg)
        bundle = bundle if bundle is not None else load_bundle(cfg)
        return cls(cfg, dev, bundle, model_spec(cfg, bundle), out, show_progress)

    @contextlib.contextmanager
    def progress(self, total: int, desc: str) -> Iterator[Any]:
        """A progress bar over `total` steps, also handed to every path of this run (`self.bar`)."""
        with progress_bar(total, desc, self.show_progress) as bar:
            self.bar = bar
            try:
                yield bar
            finally:
                self.bar = None

    def memo(self, key: str, make: Callable[[], T]) -> T:
        """`make()` once per run context and key, then the same value: what several parts of one run share
        (the materialised task stream, the deep ensemble's members). A fresh context starts empty."""
        if key not in self.memos:
            self.memos[key] = make()
        return typing.cast(T, self.memos[key])

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """(N, ...) inputs and (N,) labels of the training split, on the device (built once)."""
        return self.memo("train", lambda: self._eval_transformed(tensors(self.bundle.train, self.device)))

    def _eval_transformed(self, xy: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """`data.eval_transforms` (e.g. a resize for a ViT) on a whole in-memory split."""
        from fipray.data.stream import build_transform

        tf = build_transform(self.cfg.data.eval_transforms)
        if tf is None:
            return xy
        x, y = xy
        return torch.cat([tf(x[i:i + 256]) for i in range(0, len(x), 256)]), y

    def train_data(self) -> Any:
        """The training split as `fipray.data.stream.Examples`: streamed through a DataLoader when
        `data.stream`, else the in-memory tensors (the fast path)."""
        return self.memo("train_data", self._make_train_data)

    def _make_train_data(self) -> Any:
        from fipray.data.stream import StreamedExamples, TensorExamples, build_transform

        d = self.cfg.data
        if d.stream:
            return StreamedExamples(self.bundle.train, self.device, workers=d.workers,
                                    train_transform=build_transform(d.train_transforms),
                                    eval_transform=build_transform(d.eval_transforms))
        return TensorExamples(*self.train_tensors())

    def test_tensors(self) -> tuple[Tensor, Tensor]:
        """(N, ...) inputs and (N,) labels of the test split, on the device (built once; the whole split in
        memory: evaluate with `test_split()`, which streams a split that is not held in memory)."""
        return self.memo("test", lambda: self._eval_transformed(tensors(self.bundle.test, self.device)))

    def test_split(self) -> EvalSplit:
        """The test split for evaluation: `accuracy(model)` over every example, `head(n)` for the first n.
        A split held in memory is evaluated from `test_tensors()` (the same tensors, the same numbers);
        a streamed one (`parquet` with `in_memory: false`, or any split not in memory with `data.stream`) is
        read in batches of `data.eval_batch_size`."""
        return self.memo("test_split", self._make_test_split)

    def _make_test_split(self) -> EvalSplit:
        from fipray.data.stream import build_transform

        split = EvalSplit(self.bundle.test, self.device, batch_size=self.cfg.data.eval_batch_size,
                          transform=build_transform(self.cfg.data.eval_transforms), stream=self.cfg.data.stream)
        if split.streamed:
            return split
        return EvalSplit.of_tensors(*self.test_tensors(), batch_size=self.cfg.data.eval_batch_size)

    def rank_shard(self, *tensors: Tensor, rank: int, world: int) -> tuple[Tensor, ...]:
        """Rank `rank`'s shard (every `world`-th row from `rank`) of in-memory tensors, for a path whose
        `ray.workers_per_path` DDP ranks each take their own data; world 1 returns them as they are."""
        return shard(*tensors, rank=rank, world=world, streamed=self.cfg.data.stream)

    def model(self, seed: int) -> nn.Module:
        """A fresh network of the config's spec, initialised from `seed`."""
        return build_model(self.spec, seed, self.device)

    def checkpoint_dir(self, *parts: str) -> Path | None:
        """Where a FIP path of this run checkpoints (`out/paths/<run id>/...`); None without an output folder."""
        if self.out is None:
            return None
        return self.out.joinpath("paths", self.cfg.run_id(), *parts)

    def base_dir(self, seed: int, name: str = "base") -> Path | None:
        """Where the base network of `seed` checkpoints its training (`train_base(..., out_dir=...)`), so a rerun
        loads it instead of training it again; None without an output folder."""
        return self.checkpoint_dir(name, f"seed{seed}")

    def base_kwargs(self, seed: int, name: str = "base") -> dict:
        """`run_path` keyword arguments of a base network's own training loop: its checkpoint folder
        (`base_dir`) and how it checkpoints there (`base_checkpoints`)."""
        out_dir = self.base_dir(seed, name)
        return {"out_dir": out_dir, **base_checkpoints(self.cfg, out_dir)}

    def path_kwargs(self, heldout: Tensor | None = None, evaluate: Any = None) -> dict:
        """`run_path` keyword arguments every FIP path of this config shares."""
        from fipray.core.distances import get_distance

        cfg = self.cfg
        return dict(record_every=cfg.path.record_every, checkpoint_every=cfg.path.checkpoint_every,
                    keep_checkpoints=cfg.path.keep_checkpoints, heldout=heldout,
                    distance=get_distance(cfg.path.distance), evaluate=evaluate,
                    progress=self.bar)
