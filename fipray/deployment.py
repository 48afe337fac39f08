"""What the ensemble and robust operations and their baselines share: the deployed model, member selection,
the compute budget, and the robust section they all read.

- `Deployed`: a model to evaluate (an ensemble or one network), its members and what it cost.
- Member selection (paper Algorithm 3, the δ rule): `fgsm_output_shift`, `select_members` and `select`, on
  the fixed `selection_inputs`.
- The compute budget, in gradient evaluations (forward+backward passes over one minibatch, attack steps
  included): `step_evals` and `path_evals` of a robust FIP path, `sample_steps` / `candidates_per_path`,
  `selection_evals` of the δ rule and `fip_budget`, what the compute-matched baselines get.
- `RobustConfig`, the `robust:` section (registered by `fipray.ops.robust`, its operation), and
  `attack_args`, the training attack it configures (the robust FIP's L, PGD adversarial training): the one
  place `cfg.robust` is interpreted for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fipray.config import Config, ConfigError, knob
from fipray.core.distances import get_distance
from fipray.core.modes import eval_mode
from fipray.eval.attacks import input_gradient
from fipray.runtime import RunContext

SELECTION_EXAMPLES = 256  # training examples on which the δ rule measures FGSM output shifts


@dataclass(frozen=True)
class RobustConfig:
    """Robustness-directed FIP (L = an adversarial objective) and the adversarial baselines' budgets."""

    objective: str = knob("ce", choices=("ce", "trades"))
    train_eps: float = knob(0.1, gt=0, lt=1)  # L∞ radius of the training attack (ε_train)
    attack_steps: int = knob(3, ge=1)  # PGD steps crafting each training batch
    step_size: float = knob(0.0, ge=0)  # 0: 2.5 · train_eps / attack_steps
    diversity: str = knob("none", choices=("none", "coherence", "disagreement"))
    diversity_weight: float = knob(0.0, ge=0)  # weight of the diversity term inside L
    diversity_window: int = knob(3, ge=1)  # the most recent networks taken (w0 first) it pushes away from
    paths: int = knob(1, ge=1)  # paths from one w0 per seed in the experiment; the union is the candidate set
    sample_from: int = knob(0, ge=0)  # burn-in: only samples taken at path step >= this are candidates
    lr_cycle: int = knob(0, ge=0)  # >0: from sample_from on, cosine learning-rate cycles of this many steps
    lr_peak: float = knob(1.0, gt=0)  # each cycle's largest rate, × path.lr (it falls to path.lr / 100)
    clean_pass: bool = knob(True)  # the new batch also goes through a clean forward (false: ce's L needs none)
    validation: int = knob(0, ge=0)  # sweep trials: score on this many held-out training examples, not the test split
    clean_floor: float = knob(0.01, ge=0, lt=1)  # sweep metric whitebox_floor: clean >= base clean − this
    # Baselines (`fipray.baselines.ensemble`): pgd_at / adv_deep train with the attack above.
    at_evals: int = knob(0, ge=0)  # PGD-AT's gradient evaluations after w0 (0: those of the robust FIP paths)
    at_lr: float = knob(0.0, ge=0)  # pgd_at / adv_deep learning rate (0: train.lr, the recipe's)
    fge_cycle: int = knob(50, ge=2)  # fast geometric ensembling: steps per learning-rate cycle
    fge_lr: float = knob(0.01, gt=0)  # its largest (SGD, momentum 0.9) learning rate; the smallest is 1/100 of it
    # Where the path starts. w0: the network `train:` trains (cross-entropy). adversarial: w0 is adversarially
    # trained from scratch by the recipe below for train.steps steps of train.batch_size (train.optimizer, its
    # rate train.lr at the schedule's peak), or loaded from `base_weights`; the deep-ensemble members and the
    # independent surrogate are trained the same way, and every method's compute counts that training.
    start: str = knob("w0", choices=("w0", "adversarial"))
    recipe: str = knob("fast_fgsm", choices=("fast_fgsm", "pgd"))  # fast_fgsm: Wong et al. 2020; pgd: Madry et al.
    recipe_eps: float = knob(0.3, gt=0, lt=1)  # L∞ radius of the recipe's training attack
    recipe_alpha: float = knob(0.375, gt=0)  # fast_fgsm: the FGSM step from the random start (Wong: 1.25 ε)
    recipe_steps: int = knob(40, ge=1)  # pgd: attack steps per batch
    recipe_step_size: float = knob(0.01, gt=0)  # pgd: attack step size
    recipe_schedule: str = knob("cyclic", choices=("cyclic", "flat"))  # cyclic: 0 → train.lr at 40% → 0, per step
    base_weights: str = ""  # start: adversarial: w0's state dict from this file (or `cached:<set>/<file>`)
    # Invariance on adversarial inputs too: adv_invariance × d(f(x_adv; w), f(x_adv; w0)) joins L, x_adv the PGD
    # examples L is computed on (0: the invariance holds on clean inputs only).
    adv_invariance: float = knob(0.0, ge=0)

    def check(self, cfg: Config) -> None:
        ec = cfg.ensemble
        if ec.fip == "robust" and not ec.load and self.paths * (cfg.path.steps // ec.sample_every) < ec.members:
            raise ConfigError(f"robust.paths × (path.steps // ensemble.sample_every) = "
                              f"{self.paths * (cfg.path.steps // ec.sample_every)} sampled networks < "
                              f"ensemble.members = {ec.members}")
        if ec.fip == "robust" and not cfg.path.memory_batch_size:
            raise ConfigError("config key 'path.memory_batch_size' is 0 (the whole memory every step): the robust "
                              "FIP counts its compute per memory batch; set a batch size")
        if ec.fip == "robust" and not ec.load and self.paths * candidates_per_path(cfg) < ec.members:
            raise ConfigError(f"robust.sample_from = {self.sample_from} leaves robust.paths × "
                              f"{candidates_per_path(cfg)} sampled networks < ensemble.members = {ec.members}")
        if self.lr_cycle and cfg.path.optimizer not in ("adam", "sgd", "adamw"):
            raise ConfigError(f"config key 'robust.lr_cycle' needs a path.optimizer with a learning rate "
                              f"(adam, adamw, sgd), got {cfg.path.optimizer!r}")
        if self.lr_cycle and cfg.path.step == "metric":
            raise ConfigError("config key 'robust.lr_cycle' schedules the optimizer's learning rate; path.step: "
                              "metric has none (use path.step: penalty)")
        if not self.clean_pass and self.objective == "trades":
            raise ConfigError("config key 'robust.clean_pass' is false but robust.objective: trades needs the clean "
                              "outputs of the new batch (use objective: ce, or clean_pass: true)")
        if self.base_weights and self.start != "adversarial":
            raise ConfigError("config key 'robust.base_weights' is set but robust.start is w0 (the network `train:` "
                              "trains): use start: adversarial to start from loaded weights")
        copies = [b for b in ec.baselines if b in ("deep", "adv_deep")] + (["ensemble.review"] if ec.review else [])
        if self.base_weights and copies:
            raise ConfigError(f"config key 'robust.base_weights': {', '.join(copies)} train networks like w0 from "
                              "their own initialisations, but w0 is loaded (every one would be the same network); "
                              "drop them, or let robust.recipe train w0")
        if self.diversity != "none" and self.diversity_weight == 0:
            raise ConfigError(f"config key 'robust.diversity_weight' is 0: robust.diversity: {self.diversity} "
                              "would do nothing (set a weight, or diversity: none)")


def step_size(rc: RobustConfig) -> float:
    return rc.step_size or 2.5 * rc.train_eps / rc.attack_steps


def attack_args(rc: RobustConfig) -> dict[str, Any]:
    """The training attack of the `robust:` section as `fipray.eval.attacks.pgd_examples`' keyword arguments."""
    return {"eps": rc.train_eps, "step_size": step_size(rc), "steps": rc.attack_steps}


# The compute budget -------------------------------------------------------------------------------------------
def sample_steps(cfg: Config) -> list[int]:
    """The path steps at which a robust path's samples become candidates: every `ensemble.sample_every`
    steps, from `robust.sample_from` on (earlier samples are taken by the path but not used)."""
    every = cfg.ensemble.sample_every
    return [t for t in range(every, cfg.path.steps + 1, every) if t >= cfg.robust.sample_from]


def candidates_per_path(cfg: Config) -> int:
    return len(sample_steps(cfg))


def step_evals(cfg: Config, taken: int) -> float:
    """Gradient evaluations of one robust FIP step with `taken` networks in the diversity window.

    The memory and the new batch share one forward+backward (memory pro rata to path.batch_size), the PGD
    examples one more, each attack step one, w0's forward on them (robust.adv_invariance) one (counted whole);
    coherence adds a double backward (2) and one per earlier
    network, disagreement one per earlier network (a forward only, counted whole). With
    `robust.clean_pass: false` the new batch has no clean pass (only the memory's, pro rata)."""
    p, rc = cfg.path, cfg.robust
    mem = p.memory_batch_size / p.batch_size if p.lam else 0.0
    n = (1 if rc.clean_pass else 0) + mem + 1 + rc.attack_steps + (1 if rc.adv_invariance else 0)
    if rc.diversity == "coherence":
        n += 2 + taken
    elif rc.diversity == "disagreement":
        n += taken
    return n


def path_evals(cfg: Config) -> int:
    """Gradient evaluations of one robust FIP path (what the phase counts, computed from the config)."""
    rc, every = cfg.robust, cfg.ensemble.sample_every
    total = 0.0
    for t in range(cfg.path.steps):
        taken = min(rc.diversity_window, 1 + t // every) if rc.diversity != "none" else 0
        total += step_evals(cfg, taken)
    return int(math.ceil(total))


def recipe_step_evals(rc: RobustConfig, recipe: str | None = None) -> int:
    """Gradient evaluations of one step of the adversarial recipe (`robust.recipe`, or `recipe`): the attack's
    steps and the update."""
    return (1 if (recipe or rc.recipe) == "fast_fgsm" else rc.recipe_steps) + 1


def attack_step_evals(rc: RobustConfig) -> int:
    """Gradient evaluations of one adversarial-training update with the robust FIP's training attack: its
    `robust.attack_steps` steps and the update."""
    return rc.attack_steps + 1


def base_evals(cfg: Config) -> int:
    """Gradient evaluations of training w0 from scratch: train.steps updates, each one evaluation (start: w0) or
    `recipe_step_evals` (start: adversarial); 0 for weights loaded from `robust.base_weights` (trained elsewhere, at
    a cost this run does not know)."""
    rc = cfg.robust
    if rc.start == "w0":
        return cfg.train.steps
    return 0 if rc.base_weights else cfg.train.steps * recipe_step_evals(rc)


def selection_evals(candidates: int, batch_size: int) -> int:
    """The δ rule's FGSM shift: one forward+backward over its `SELECTION_EXAMPLES` examples per candidate."""
    return candidates * math.ceil(SELECTION_EXAMPLES / batch_size)


def fip_budget(cfg: Config) -> int:
    """Gradient evaluations after w0 that the robust FIP ensemble spends (its paths and the δ rule), or
    `robust.at_evals` when set: the budget PGD-AT and the adversarial deep ensemble get."""
    if cfg.robust.at_evals:
        return cfg.robust.at_evals
    candidates = cfg.robust.paths * candidates_per_path(cfg)
    return cfg.robust.paths * path_evals(cfg) + selection_evals(candidates, cfg.path.batch_size)


# The deployed model -------------------------------------------------------------------------------------------
@dataclass
class Deployed:
    """A model to evaluate (an ensemble or one network), its members and what it cost."""

    target: nn.Module
    members: list[nn.Module]
    seconds: float
    gradient_steps: int
    # Forward+backward passes over one minibatch, attack steps included (0: `gradient_steps`, the methods
    # whose every step is one such pass).
    gradient_evals: int = 0

    @property
    def evals(self) -> int:
        return self.gradient_evals or self.gradient_steps


# Member selection (the δ rule) --------------------------------------------------------------------------------
def fgsm_output_shift(model: nn.Module, x: Tensor, y: Tensor, eps: float, distance: str) -> float:
    """H = d(f(x; w), f(x'; w)) with x' = clip(x + ε·sign ∇_x CE) (Algorithm 3, line 10)."""
    with eval_mode(model):
        g = input_gradient(model, x, y)
        x_adv = (x + eps * g.sign()).clamp(0, 1)
        with torch.no_grad():
            return float(get_distance(distance)(model(x_adv), model(x)))


def select_members(candidates: list[nn.Module], x: Tensor, y: Tensor, *, members: int, eps: float,
                   delta: float, distance: str) -> tuple[list[int], list[float]]:
    """Indices of the kept candidates (δ rule) and every candidate's H.

    δ > 0 keeps candidates with H ≤ δ (lowest H first, at most `members`); δ = 0 keeps the
    `members` candidates with the lowest H. Raises if fewer than `members` qualify.
    """
    h = [fgsm_output_shift(m, x, y, eps, distance) for m in candidates]
    order = sorted(range(len(h)), key=lambda i: h[i])
    if delta > 0:
        order = [i for i in order if h[i] <= delta]
    if len(order) < members:
        raise ValueError(
            f"only {len(order)} of {len(candidates)} sampled networks qualify (δ = {delta}); "
            f"need ensemble.members = {members}: raise ensemble.delta, path.steps or lower sample_every"
        )
    return sorted(order[:members]), h


def selection_inputs(data: Any) -> tuple[Tensor, Tensor]:
    """The 256 training examples (fixed, seed 0) on which the δ rule measures FGSM output shifts."""
    return data.take(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:SELECTION_EXAMPLES])


def select(ctx: RunContext, candidates: list[nn.Module]) -> tuple[list[int], list[float]]:
    """The δ rule on the fixed selection inputs (a ConfigError when too few candidates qualify)."""
    ec = ctx.cfg.ensemble
    xs, ys = selection_inputs(ctx.train_data())
    try:
        return select_members(candidates, xs, ys, members=ec.members, eps=ec.fgsm_eps, delta=ec.delta,
                              distance=ctx.cfg.path.distance)
    except ValueError as e:
        raise ConfigError(f"config key 'ensemble.delta': {e}") from None
