"""Sparsification baselines: one-shot magnitude pruning, with masked fine-tuning, iterative (IMP), Wanda,
and lottery tickets (LTH) by open_lth's protocol.

The magnitude ones prune globally by |w|; wanda (Sun et al. 2023) prunes each output row by |w|·‖x‖ on
calibration inputs. All act on the same counted tensors as FIP and end exactly as sparse as FIP:
N − keep_count(N, p) zeros over the N counted weights. Fine-tuning baselines get as many optimizer
steps as the FIP path uses in all (at `sparsify.finetune_lr`); wanda is one-shot (no update besides the mask).

`lth` is sequential: one run per seed from the untrained network passes every target in turn (levels of
train, prune, reset), so it is registered apart (`SEQUENTIAL_BASELINES`) and called once per seed with the
initial weights and all the targets; its compute is that of its own levels (its dense training included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray.config import Config, TrainConfig, knob
from fipray.core.masks import apply_masks, counted_tensors, keep_count, largest_masks, magnitude_masks
from fipray.core.modes import eval_mode
from fipray.eval.sparsity import is_hf_conv1d, sparsity
from fipray.optim import OPTIMIZERS
from fipray.path import Phase, PhaseState, run_path
from fipray.phases import supervised_phase
from fipray.registry import Registry

# name -> (model, names, p, x, y, cfg, seed, progress) -> None: prunes `model` in place to exactly p.
# `sparsify.baselines` names them; fine-tuning ones get path.steps + sparsify.invariance_steps steps.
SPARSIFY_BASELINES: Registry = Registry("sparsify baseline")
# name -> (init, names, targets, x, y, cfg, seed, *, evaluate, out_dir, progress) -> rows: one run per seed from
# the untrained network `init` passing every target (`lottery_ticket`); a row per target.
SEQUENTIAL_BASELINES: Registry = Registry("sequential sparsify baseline")


def baseline_names() -> list[str]:
    """Every name `sparsify.baselines` accepts: the per-target baselines, then the sequential ones."""
    return [*SPARSIFY_BASELINES.names(), *SEQUENTIAL_BASELINES.names()]


def finetune_steps(cfg: Config) -> int:
    """Steps a fine-tuning baseline gets: as many as the FIP path takes in all."""
    return cfg.path.steps + cfg.sparsify.invariance_steps


def finetune_train(cfg: Config) -> TrainConfig:
    """How the fine-tuning baselines train: `train:`, at `sparsify.finetune_lr` when set (0: train.lr)."""
    return replace(cfg.train, lr=cfg.sparsify.finetune_lr or cfg.train.lr)


def one_shot(model: nn.Module, names: list[str], p: float) -> list[Tensor]:
    """Prune `model` in place to exactly p; returns the keep-masks."""
    masks = magnitude_masks(counted_tensors(model, names), p)
    apply_masks(counted_tensors(model, names), masks)
    return masks


def _masked_finetune(model: nn.Module, names: list[str], masks: list[Tensor], x: Tensor, y: Tensor,
                     train: TrainConfig, seed: int, steps: int, name: str, progress=None) -> None:
    def remask(m: nn.Module, state: dict) -> None:
        apply_masks(counted_tensors(m, names), masks)

    phase = supervised_phase(name, x, y, train, seed, steps=steps, after_step=remask)
    run_path(model, [phase], record_every=10**9, checkpoint_every=10**9, progress=progress)


def magnitude_finetune(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor,
                       train: TrainConfig, seed: int, steps: int, progress=None) -> None:
    """One-shot prune to p, then masked cross-entropy fine-tuning for `steps` steps."""
    masks = one_shot(model, names, p)
    _masked_finetune(model, names, masks, x, y, train, seed, steps, "finetune", progress)


def imp_schedule(p: float, rate: float = 0.2) -> list[float]:
    """Sparsities of the IMP rounds: prune `rate` of the remaining weights per round, last round = p."""
    rounds = max(1, math.ceil(math.log(1 - p) / math.log(1 - rate)))
    return [1 - (1 - p) ** (k / rounds) for k in range(1, rounds + 1)]


def iterative_magnitude(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor,
                        train: TrainConfig, seed: int, steps: int, progress=None) -> None:
    """IMP (Frankle & Carbin 2019, without rewinding): prune 20% of the remaining weights, fine-tune,
    repeat until p; the fine-tuning steps are split evenly over the rounds (equal total steps)."""
    schedule = imp_schedule(p)
    per_round = max(1, steps // len(schedule))
    for k, q in enumerate(schedule):
        masks = one_shot(model, names, q)  # magnitudes of the survivors: earlier zeros stay zero
        _masked_finetune(model, names, masks, x, y, train, seed + k, per_round, f"imp{k}", progress)


@SPARSIFY_BASELINES.register("magnitude")
def _magnitude(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor, cfg: Config, seed: int,
               progress: Any = None) -> None:
    one_shot(model, names, p)


@SPARSIFY_BASELINES.register("magnitude_ft")
def _magnitude_ft(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor, cfg: Config, seed: int,
                  progress: Any = None) -> None:
    magnitude_finetune(model, names, p, x, y, finetune_train(cfg), seed, finetune_steps(cfg), progress=progress)


@SPARSIFY_BASELINES.register("imp")
def _imp(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor, cfg: Config, seed: int,
         progress: Any = None) -> None:
    iterative_magnitude(model, names, p, x, y, finetune_train(cfg), seed, finetune_steps(cfg), progress=progress)


# Lottery tickets (open_lth) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LotteryConfig:
    """`sparsify.lth`: lottery tickets as open_lth runs them (Frankle & Carbin 2019; the defaults are open_lth's
    `mnist_lenet_300_100`: SGD without momentum, lr 0.1, batch 128, 40 epochs a level, 20% of the remaining
    weights pruned a level by global magnitude, the output layer never pruned, survivors reset to init).

    An epoch is ⌊N/batch_size⌋ steps (fipray's batch streams drop the last partial batch; open_lth's has
    ⌈N/batch_size⌉). `rewind_steps` > 0 resets to the weights after that many steps of the dense training
    (Frankle et al. 2020) instead of the initial ones. The output layer is the classifier head: with
    `prune_head` false (open_lth), `sparsify.exclude_head` must be true, so that every method counts the same
    tensors and the sparsities compare.
    """

    epochs_per_level: int = knob(40, gt=0)
    rate: float = knob(0.2, gt=0, lt=1)  # fraction of the remaining counted weights pruned a level
    lr: float = knob(0.1, gt=0)
    batch_size: int = knob(128, gt=0)
    optimizer: str = knob("plain_sgd", choices=OPTIMIZERS.names)
    rewind_steps: int = knob(0, ge=0)  # 0: reset to the initial weights
    prune_head: bool = False  # open_lth never prunes the output layer
    steps_per_level: int = knob(0, ge=0)  # > 0: this many steps a level instead of the epochs (smoke tests)


def level_steps(lth: LotteryConfig, n: int) -> int:
    """Optimizer steps of one level over n training examples: `epochs_per_level` epochs of ⌊n/batch_size⌋
    steps, or `steps_per_level` when set."""
    return lth.steps_per_level or lth.epochs_per_level * max(1, n // lth.batch_size)


def lottery_schedule(n: int, targets: Sequence[float], rate: float) -> list[tuple[int, tuple[float, ...]]]:
    """Keep counts of levels 0 (dense), 1, 2, ... and the targets each level meets.

    Each level prunes ⌈rate·remaining⌉ of the remaining weights (open_lth's `sparse_global`), except a level
    that would pass the next target: it prunes fewer and lands on it exactly (keep_count(n, p), the count
    every other method keeps), so each target is met exactly. Targets that are open_lth's level sparsities
    (to 6 digits: within 1/(2n) for n < 10⁶) give open_lth's levels unchanged: for LeNet-300-100 without its
    head (n = 265,200) levels 1, 5, 10, 15, 20-23 are 0.2, 0.672323, 0.892632, 0.964823, 0.988477, 0.990784,
    0.992628, 0.994103; the rounded 0.2, 0.67, 0.89, 0.96, 0.987, 0.99, 0.991, 0.994 would be met at levels 1,
    5, 10, 15, 21, 23, 24, 26 instead (each landing delays the next levels). The schedule ends at the largest
    target.

    Returns:
        [(keep count, targets met at this level)], level 0 first (keep = n).
    """
    levels: list[tuple[int, list[float]]] = [(n, [])]
    for p in sorted(set(targets)):
        goal = keep_count(n, p)
        while levels[-1][0] > goal:
            remaining = levels[-1][0]
            nxt = remaining - math.ceil(rate * remaining)
            levels.append((goal, []) if nxt <= goal else (nxt, []))
        levels[-1][1].append(p)
    return [(k, tuple(ps)) for k, ps in levels]


def lottery_phases(names: list[str], schedule: list[tuple[int, tuple[float, ...]]], x: Tensor, y: Tensor,
                   lth: LotteryConfig, seed: int, reset: dict[str, Tensor],
                   finish: Callable[[nn.Module, int], dict]) -> list[Phase]:
    """The levels of a lottery-ticket run as phases of one path (so a run resumes at the level it stopped).

    Level 0 trains the dense network (from the rewind point: its first `rewind_steps` steps are taken
    before, see `lottery_ticket`); level L ≥ 1 keeps the schedule's count of largest |w| among the counted
    weights (earlier zeros are the smallest: masks only shrink), resets every parameter to `reset` (the
    initial or rewind-point state dict; biases and the head too, as open_lth), zeroes the pruned weights and
    trains `epochs_per_level` epochs with the mask re-applied after every step.

    Args:
        finish: (model, level) -> results of that level (kept in the path's `phase_results`).
    """
    per_level = level_steps(lth, len(x))
    train = TrainConfig(steps=per_level, batch_size=lth.batch_size, lr=lth.lr, optimizer=lth.optimizer)

    def level_phase(level: int, keep: int) -> Phase:
        def prepare(model: nn.Module) -> PhaseState:
            masks = largest_masks(counted_tensors(model, names), keep)
            model.load_state_dict(reset)
            apply_masks(counted_tensors(model, names), masks)
            return {"masks": masks}

        def remask(model: nn.Module, state: PhaseState) -> None:
            apply_masks(counted_tensors(model, names), state["masks"])

        return supervised_phase(f"lth_level{level}", x, y, train, seed, prepare=prepare, after_step=remask,
                                finish=lambda m, s: finish(m, level))

    dense = supervised_phase("lth_level0", x, y, train, seed, steps=max(0, per_level - lth.rewind_steps),
                             finish=lambda m, s: finish(m, 0))
    return [dense, *(level_phase(level, keep) for level, (keep, _) in enumerate(schedule) if level > 0)]


def rewind_point(init: nn.Module, x: Tensor, y: Tensor, lth: LotteryConfig, seed: int) -> dict[str, Tensor]:
    """The state every level resets to: w_init, or with `rewind_steps` > 0 the weights after that many steps
    of the dense training (`init` is trained in place to there; a pure function of the seed, so a resumed run
    recomputes the same point). Returns a copy of the state dict."""
    if lth.rewind_steps:
        first = TrainConfig(steps=lth.rewind_steps, batch_size=lth.batch_size, lr=lth.lr, optimizer=lth.optimizer)
        run_path(init, [supervised_phase("lth_rewind", x, y, first, seed)], record_every=10**9,
                 checkpoint_every=10**9)
    return {k: v.detach().clone() for k, v in init.state_dict().items()}


def lottery_ticket(init: nn.Module, names: list[str], targets: Sequence[float], x: Tensor, y: Tensor,
                   lth: LotteryConfig, seed: int, *, evaluate: Callable[[nn.Module], dict],
                   out_dir: str | Path | None = None, progress: Any = None) -> list[dict]:
    """Lottery tickets to every target in one run: train, prune `rate` of the remaining weights, reset, repeat.

    Args:
        init: the untrained network (w_init), updated in place (it ends as the ticket at the largest target).
        names: the counted tensors, the only ones pruned (open_lth: all but the output layer).
        targets: sparsities; each is met exactly at a level (`lottery_schedule`).
        x, y: (N, ...) training inputs and (N,) labels.
        evaluate: model -> metrics (e.g. test accuracy) of the network at each target and of the dense one.
        out_dir: checkpoints at every level boundary (a rerun resumes there); None: none.

    Returns:
        A row per target {"target", "level", "keep", "sparsity", "steps", "examples", "seconds", **evaluate},
        then one for the dense level 0 (target 0.0). `steps` are the optimizer steps (each a gradient on a
        batch of `batch_size`) from w_init to that level, rewind steps and dense training included; `seconds`
        the wall time of this call up to it (a resumed run counts only what it ran).
    """
    t0 = time.perf_counter()
    n = sum(t.numel() for t in counted_tensors(init, names))
    schedule = lottery_schedule(n, targets, lth.rate)
    per_level = level_steps(lth, len(x))
    if lth.rewind_steps > per_level:
        raise ValueError(f"sparsify.lth.rewind_steps ({lth.rewind_steps}) exceeds a level's {per_level} steps")
    reset = rewind_point(init, x, y, lth, seed)

    def finish(model: nn.Module, level: int) -> dict:
        return {"level": level, "keep": schedule[level][0], "sparsity": sparsity(model, names),
                "steps": (level + 1) * per_level, "examples": (level + 1) * per_level * lth.batch_size,
                "seconds": time.perf_counter() - t0, **evaluate(model)}

    res = run_path(init, lottery_phases(names, schedule, x, y, lth, seed, reset, finish), out_dir=out_dir,
                   record_every=10**9, checkpoint_every=10**9, progress=progress, train_mode=True)
    rows = [{"target": p, **res.phase_results[f"lth_level{level}"]}
            for level, (_, ps) in enumerate(schedule) for p in ps]
    return [*rows, {"target": 0.0, **res.phase_results["lth_level0"]}]


@SEQUENTIAL_BASELINES.register("lth")
def _lth(init: nn.Module, names: list[str], targets: Sequence[float], x: Tensor, y: Tensor, cfg: Config, seed: int,
         *, evaluate: Callable[[nn.Module], dict], out_dir: str | Path | None = None,
         progress: Any = None) -> list[dict]:
    return lottery_ticket(init, names, targets, x, y, cfg.sparsify.lth, seed, evaluate=evaluate, out_dir=out_dir,
                          progress=progress)


# Wanda ------------------------------------------------------------------------------------------------

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CALIBRATION_BATCH = 64


@torch.no_grad()
def per_row_masks(scores: list[Tensor], p: float) -> list[Tensor]:
    """Keep-masks from (rows, K) score matrices: each row keeps its highest-scored entries.

    Over the N entries of all matrices exactly k = keep_count(N, p) survive (the count global
    magnitude pruning and FIP keep, so the global sparsity is (N − k)/N, within 1/(2N) of p). They are
    apportioned to rows in proportion to their length: a row of K entries keeps ⌊K·k/N⌋ or ⌈K·k/N⌉
    (its own sparsity is within 1/K of the global one); the rows that get the extra entry are those
    with the largest fractional part K·k/N, then, among equals (e.g. all the rows of one tensor), those
    whose next entry has the highest score. Ties in scores keep the lower index (stable sort).

    Args:
        scores: one (rows, K) float matrix per tensor (any rows and K).
        p: target sparsity in [0, 1].

    Returns:
        Boolean (rows, K) keep-masks, in the order of ``scores``.
    """
    n = sum(s.numel() for s in scores)
    k = keep_count(n, p)
    orders, counts, rems, nexts = [], [], [], []
    for s in scores:
        rows, width = s.shape
        vals, order = s.float().sort(dim=1, descending=True, stable=True)
        base, rem = divmod(width * k, n)
        orders.append(order)
        counts.append(torch.full((rows,), base, dtype=torch.long, device=s.device))
        rems.append(torch.full((rows,), rem, dtype=torch.long, device=s.device))
        nexts.append(vals[:, base] if base < width else torch.full((rows,), -math.inf, device=s.device))
    count = torch.cat(counts)
    extra = k - int(count.sum())
    if extra > 0:  # rows with the largest remainder, then the best next score (lexicographic, two stable sorts)
        by_next = torch.cat(nexts).argsort(descending=True, stable=True)
        by_rem = torch.cat(rems)[by_next].argsort(descending=True, stable=True)
        count[by_next[by_rem[:extra]]] += 1
    masks, i = [], 0
    for order in orders:
        rows, width = order.shape
        kept = torch.arange(width, device=order.device)[None, :] < count[i:i + rows, None]
        masks.append(torch.zeros_like(kept).scatter_(1, order, kept))
        i += rows
    assert sum(int(m.sum()) for m in masks) == k
    return masks


def _conv_patch_sq(module: nn.Module, x: Tensor) -> Tensor:
    """Σ over examples and output positions of x² at each (input channel, kernel offset): (C, *kernel).

    A convolution is a Linear over unfolded input patches; these are the squared norms of that
    Linear's input features, taken with the module's own padding (mode included), stride and dilation.
    """
    assert isinstance(module, _CONV)
    dims = len(module.kernel_size)
    if x.dim() == dims + 1:  # unbatched input
        x = x.unsqueeze(0)
    sq = x.detach().float().pow(2).sum(0, keepdim=True)  # (1, C, *spatial); x² commutes with every padding mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        sq = F.pad(sq, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    sq = sq[0]
    for d in range(dims):
        sq = sq.unfold(1 + d, module.dilation[d] * (module.kernel_size[d] - 1) + 1, module.stride[d])
    every: list[Any] = [Ellipsis, *(slice(None, None, step) for step in module.dilation)]
    sq = sq[tuple(every)]  # (C, *out, *kernel)
    return sq.sum(dim=tuple(range(1, 1 + dims)))


def _input_sq(module: nn.Module, x: Tensor) -> Tensor:
    """Squared L2 norm of each input feature of `module` over all rows (tokens, positions) of x."""
    if isinstance(module, _CONV):
        return _conv_patch_sq(module, x)
    return x.detach().float().reshape(-1, x.shape[-1]).pow(2).sum(0)


def _row_scores(module: nn.Module, sq: Tensor) -> Tensor:
    """Wanda's |W_ij|·‖X_j‖ as a (outputs, inputs per output) matrix."""
    w, norm = _weight(module).detach().abs().float(), sq.sqrt()
    if isinstance(module, nn.Linear):
        return w * norm[None, :]
    if isinstance(module, _CONV):  # (out, C/groups, *kernel); the norms of a row's group of input channels
        out = w.shape[0]
        norm = norm.reshape(module.groups, -1).repeat_interleave(out // module.groups, dim=0)
        return w.reshape(out, -1) * norm
    return (w * norm[:, None]).T  # transformers' Conv1D: weight (in, out)


def _to_weight_layout(module: nn.Module, mask: Tensor) -> Tensor:
    return mask.T if is_hf_conv1d(module) else mask.reshape(_weight(module).shape)


def _weight(module: nn.Module) -> Tensor:
    w = module.weight
    assert isinstance(w, Tensor)
    return w


def _counted_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    modules = []
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name)
        if attr != "weight" or not (isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
                                    or is_hf_conv1d(module)):
            raise ValueError(f"wanda prunes Linear/Conv weights; {name!r} is not one")
        modules.append(module)
    return modules


@torch.no_grad()
def input_norms_sq(model: nn.Module, names: list[str], x: Tensor) -> list[Tensor]:
    """Squared input-feature norms of each counted module over the inputs x (eval mode, no grad).

    Forward hooks on the modules owning the counted weights accumulate Σ x² per input feature over
    every example and every token/position (N·L rows for a transformer, padding tokens included); a
    Conv's features are its (input channel, kernel offset) pairs. A module called several times in a
    forward accumulates all its calls. Returns one tensor per name: (in,) for Linear/Conv1D,
    (C, *kernel) for Conv.
    """
    modules = _counted_modules(model, names)
    acc: dict[int, Tensor] = {}

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            sq = _input_sq(module, args[0])
            acc[i] = acc[i] + sq if i in acc else sq
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with eval_mode(model):
            for start in range(0, len(x), _CALIBRATION_BATCH):
                model(x[start:start + _CALIBRATION_BATCH])
    finally:
        for h in handles:
            h.remove()
    missing = [n for i, n in enumerate(names) if i not in acc]
    if missing:
        raise ValueError(f"wanda: counted modules saw no input during calibration: {missing}")
    return [acc[i] for i in range(len(names))]


def calibration_inputs(x: Any, n: int, seed: int) -> Tensor:
    """n training inputs drawn without replacement (seeded; all of x if it has at most n); x a tensor
    or streamed `fipray.data.stream.Examples`."""
    if not isinstance(x, Tensor):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return x.take(idx)[0]
    if n >= len(x):
        return x
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx.to(x.device)]


@torch.no_grad()
def wanda_masks(model: nn.Module, names: list[str], p: float, x: Tensor) -> list[Tensor]:
    """Wanda keep-masks (Sun et al. 2023) with calibration inputs x, in the counted tensors' layouts.

    Score S_ij = |W_ij|·‖X_j‖₂ (X_j: input feature j of that layer over all calibration rows), compared
    within each output row (a Conv's output channel, over its input channels × kernel offsets); the
    per-row counts and the exact global total are those of `per_row_masks`.
    """
    modules = _counted_modules(model, names)
    scores = [_row_scores(m, sq) for m, sq in zip(modules, input_norms_sq(model, names, x))]
    return [_to_weight_layout(m, mask) for m, mask in zip(modules, per_row_masks(scores, p))]


def wanda(model: nn.Module, names: list[str], p: float, x: Tensor, calibration: int, seed: int) -> list[Tensor]:
    """Prune `model` in place with Wanda on `calibration` seeded training inputs; returns the keep-masks."""
    masks = wanda_masks(model, names, p, calibration_inputs(x, calibration, seed))
    apply_masks(counted_tensors(model, names), masks)
    return masks


@SPARSIFY_BASELINES.register("wanda")
def _wanda(model: nn.Module, names: list[str], p: float, x: Tensor, y: Tensor, cfg: Config, seed: int,
           progress: Any = None) -> None:
    wanda(model, names, p, x, cfg.sparsify.calibration, seed)
