"""White-box and transfer robustness with torchattacks, an ε curve, and the protocol's sanity flags.

Attacked models must return logits or log-probabilities (the :class:`~fipray.ensemble.Ensemble`
log-mean-softmax head qualifies): torchattacks applies cross-entropy to the output, which is exact
for both because ``log_softmax(log p) = log p``. Inputs lie in [0, 1]; normalisation lives inside
the model. Attacks run in eval mode and restore every submodule's training flag afterwards, and the
random start draws from a seeded, forked RNG so that evaluation never perturbs training randomness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from fipray.eval._common import (
    accuracy,
    check_batch,
    check_batch_size,
    check_unit_range,
    eval_mode,
    input_gradients,
    model_device,
    predictions,
)


def _check_attack_args(x: Tensor, y: Tensor, eps: float) -> None:
    check_batch(x, y)
    check_unit_range(x)
    if not eps >= 0:  # also rejects NaN
        raise ValueError(f"eps must be >= 0, got {eps}")


def _run_attack(attack, model: nn.Module, x: Tensor, y: Tensor, seed: int) -> Tensor:
    # torchattacks draws its random start from torch's global RNGs: fork them (restored on exit) and
    # seed the fork. Our eval_mode rather than torchattacks' own switch restores per-submodule flags.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), eval_mode(model):
        torch.manual_seed(seed)
        return attack(x, y).detach()


def _adv_accuracy(
    target: nn.Module, x: Tensor, y: Tensor, craft: Callable[..., Tensor], *, seed: int, batch_size: int
) -> float:
    """Accuracy of ``target`` on ``craft(xb, yb, seed=seed + i)`` for each batch i of (x, y)."""
    correct = 0
    for i, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size))):
        pred = predictions(target, craft(xb, yb, seed=seed + i), batch_size=batch_size)
        correct += int((pred == yb.to(pred.device)).sum())
    return correct / x.shape[0]


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 20,
    alpha: float | None = None,
    random_start: bool = True,
    seed: int = 0,
) -> Tensor:
    """L∞ projected gradient descent (torchattacks.PGD) on ``model`` itself.

    Args:
        model: Maps ``(B, *input_shape)`` in [0, 1] to logits or log-probabilities ``(B, C)``.
        x: Clean inputs ``(N, *input_shape)`` in [0, 1].
        y: True labels ``(N,)``.
        eps: L∞ radius; 0 returns a copy of ``x``.
        steps: Gradient steps (the protocol asks for >= 20).
        alpha: Step size; default ``2.5 * eps / steps`` so the iterate can cross the whole ball.
        random_start: Start from a uniform point in the ball.
        seed: Seed of the random start (global RNG state is saved and restored around the attack).

    Returns:
        Adversarial inputs ``(N, *input_shape)`` in [0, 1] with ``|x_adv - x|_∞ <= eps``, on the model's device.

    Raises:
        ValueError: inputs outside [0, 1], negative ``eps``, ``steps < 1``, or mismatched ``x``/``y``.
    """
    import torchattacks

    _check_attack_args(x, y, eps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eps == 0:
        return x.detach().clone().to(model_device(model, x.device))
    alpha = 2.5 * eps / steps if alpha is None else alpha
    attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    return _run_attack(attack, model, x, y, seed)


def fgsm_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Single-step L∞ fast gradient sign attack (torchattacks.FGSM); deterministic, so no seed.

    Args:
        model: Maps ``(B, *input_shape)`` in [0, 1] to logits or log-probabilities ``(B, C)``.
        x: Clean inputs ``(N, *input_shape)`` in [0, 1].
        y: True labels ``(N,)``.
        eps: L∞ radius; 0 returns a copy of ``x``.

    Returns:
        Adversarial inputs ``(N, *input_shape)`` in [0, 1], on the model's device.
    """
    import torchattacks

    _check_attack_args(x, y, eps)
    if eps == 0:
        return x.detach().clone().to(model_device(model, x.device))
    return _run_attack(torchattacks.FGSM(model, eps=eps), model, x, y, seed=0)


class _AsImage(nn.Module):
    """Presents inputs of any per-example shape to ``model`` as images ``(N, 1, 1, D)``.

    torchattacks' APGD/FAB/Square assume 4-D image batches; reshaping leaves an L∞ ball unchanged.
    """

    def __init__(self, model: nn.Module, shape: Sequence[int]):
        super().__init__()
        self.model, self.shape = model, tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.reshape(x.shape[0], *self.shape))


def _autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, num_classes: int, seed: int) -> Tensor:
    """torchattacks' standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) at L∞ radius ``eps``."""
    import torchattacks

    if eps == 0:
        return x.detach().clone().to(model_device(model, x.device))
    if x.ndim != 4:
        wrapped = _AsImage(model, x.shape[1:])
        adv = _autoattack(
            wrapped, x.reshape(x.shape[0], 1, 1, -1), y, eps=eps, num_classes=num_classes, seed=seed
        )
        return adv.reshape(x.shape)
    attack = torchattacks.AutoAttack(
        model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed
    )
    return _run_attack(attack, model, x, y, seed)


def robustness_curve(
    target: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_list: Sequence[float],
    *,
    surrogate: nn.Module | None = None,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    autoattack: bool = False,
) -> list[dict[str, float]]:
    """Clean, white-box and transfer accuracy of ``target`` for each ε.

    White-box: PGD run on ``target`` itself. Transfer: PGD crafted on ``surrogate`` (e.g. the base
    network w₀, or an independently trained one) and evaluated on ``target``. Batch i of the data
    uses seed ``seed + i`` for the random start.

    Args:
        target: The deployed model (e.g. an Ensemble), logits or log-probabilities ``(B, C)``.
        x: Clean inputs ``(N, *input_shape)`` in [0, 1].
        y: Labels ``(N,)``.
        eps_list: L∞ radii, e.g. ``[0, 8/255, 0.1, 0.3]``.
        surrogate: Model the transfer attack is crafted on; None leaves ``transfer`` NaN.
        steps: PGD steps for both attacks.
        seed: Base seed of the random starts.
        batch_size: Examples per attack batch.
        autoattack: Also run torchattacks' standard AutoAttack on ``target`` (slow: includes a
            5000-query Square attack); otherwise the ``autoattack`` column is NaN.

    Returns:
        One row per ε, in the given order: ``{"eps", "clean", "whitebox", "transfer", "autoattack",
        "steps", "n"}`` with accuracies in [0, 1].
    """
    check_batch(x, y)
    check_unit_range(x)
    check_batch_size(batch_size)
    clean = accuracy(target, x, y, batch_size=batch_size)
    num_classes = 0
    if autoattack:
        with eval_mode(target), torch.no_grad():
            num_classes = int(target(x[:1].to(model_device(target, x.device))).shape[-1])

    def adv_acc(craft: Callable[..., Tensor] | None) -> float:
        return (
            math.nan
            if craft is None
            else _adv_accuracy(target, x, y, craft, seed=seed, batch_size=batch_size)
        )

    rows = []
    for eps in map(float, eps_list):
        whitebox = partial(pgd_attack, target, eps=eps, steps=steps)
        transfer = None if surrogate is None else partial(pgd_attack, surrogate, eps=eps, steps=steps)
        auto = partial(_autoattack, target, eps=eps, num_classes=num_classes) if autoattack else None
        rows.append(
            {
                "eps": eps,
                "clean": clean,
                "whitebox": adv_acc(whitebox),
                "transfer": adv_acc(transfer),
                "autoattack": adv_acc(auto),
                "steps": steps,
                "n": int(x.shape[0]),
            }
        )
    return rows


def sanity_flags(
    rows: Sequence[dict[str, float]],
    *,
    target: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps_list: Sequence[int] = (10, 40),
    tol: float = 0.01,
    near_zero: float = 0.1,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, dict]:
    """The protocol's sanity checks on a robustness curve, with the numbers behind each verdict.

    Flags (True = the check passed):

    - ``acc_decreases_with_eps``: white-box accuracy, sorted by ε, never rises by more than ``tol``.
    - ``acc_near_zero_at_max_eps``: white-box accuracy at the largest ε is <= ``near_zero`` (0.1 by
      default; a model robust at the largest ε of the curve, which includes 0.3 per the protocol,
      more likely hides gradient masking than real robustness).
    - ``more_steps_not_better``: PGD at ``eps`` with each number of steps in ``steps_list`` (sorted)
      reaches an accuracy at most ``tol`` above the one with fewer steps.
    - ``whitebox_le_transfer``: at every ε, white-box accuracy <= transfer accuracy + ``tol``;
      None when no row has a transfer accuracy (nothing to check).
    - ``nonzero_input_gradients``: no input of ``x`` has an all-zero gradient of the loss.

    ``tol`` absorbs the randomness of PGD's random start (one example of 100 is 0.01).

    Args:
        rows: Output of :func:`robustness_curve` for ``target``.
        target: The attacked model.
        x: Inputs ``(N, *input_shape)`` in [0, 1] (typically those the curve used).
        y: Labels ``(N,)``.
        eps: Radius for the steps comparison.
        steps_list: PGD step counts to compare.
        tol: Allowed accuracy slack for the monotonicity checks.
        near_zero: Threshold of ``acc_near_zero_at_max_eps``.
        seed: Seed of PGD's random start.
        batch_size: Examples per attack batch.

    Returns:
        ``{"flags": {name: bool | None}, "measured": {name: numbers}}``: ``measured`` holds the
        white-box accuracy per ε, the accuracy at the largest ε, the accuracy per step count,
        (eps, whitebox, transfer) triples and the fraction of zero input-gradients.
    """
    if not rows:
        raise ValueError("rows is empty: run robustness_curve first")
    check_batch(x, y)
    check_batch_size(batch_size)
    ordered = sorted(rows, key=lambda r: r["eps"])
    wb = [(float(r["eps"]), float(r["whitebox"])) for r in ordered]
    decreasing = all(b[1] <= a[1] + tol for a, b in zip(wb, wb[1:]))
    acc_at_max = wb[-1][1]

    steps_sorted = sorted(int(s) for s in steps_list)
    by_steps = {
        n: _adv_accuracy(
            target, x, y, partial(pgd_attack, target, eps=eps, steps=n), seed=seed, batch_size=batch_size
        )
        for n in steps_sorted
    }
    steps_ok = all(by_steps[b] <= by_steps[a] + tol for a, b in zip(steps_sorted, steps_sorted[1:]))

    pairs = [(float(r["eps"]), float(r["whitebox"]), float(r["transfer"])) for r in ordered]
    checked = [(e, w, t) for e, w, t in pairs if not math.isnan(t)]
    wb_le_tr = all(w <= t + tol for _, w, t in checked) if checked else None

    grads = input_gradients(target, x, y, batch_size=batch_size)
    zero_frac = float((grads.flatten(1).abs().amax(dim=1) == 0).float().mean())

    return {
        "flags": {
            "acc_decreases_with_eps": decreasing,
            "acc_near_zero_at_max_eps": acc_at_max <= near_zero,
            "more_steps_not_better": steps_ok,
            "whitebox_le_transfer": wb_le_tr,
            "nonzero_input_gradients": zero_frac == 0.0,
        },
        "measured": {
            "whitebox_by_eps": wb,
            "whitebox_at_max_eps": acc_at_max,
            "max_eps": wb[-1][0],
            "steps_eps": float(eps),
            "whitebox_by_steps": by_steps,
            "whitebox_transfer_by_eps": pairs,
            "zero_input_gradient_fraction": zero_frac,
            "tol": tol,
            "near_zero": near_zero,
        },
    }
