"""Robustness measurements: white-box and transfer accuracy, an ε curve, transfer matrices, the protocol's sanity flags.

The attacks themselves (PGD, FGSM, AutoAttack through torchattacks) live in :mod:`fipray.eval.attacks`.

Attacked models must return logits or log-probabilities (the :class:`~fipray.ensemble.Ensemble`
log-mean-softmax head qualifies): torchattacks applies cross-entropy to the output, which is exact
for both because ``log_softmax(log p) = log p``. Inputs lie in [0, 1]; normalisation lives inside
the model. Attacks run in eval mode and restore every submodule's training flag afterwards, and the
random start draws from a seeded, forked RNG so that evaluation never perturbs training randomness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from fipray.core.modes import eval_mode
from fipray.eval.attacks import auto_attack, pgd_attack
from fipray.eval.predict import (
    accuracy,
    check_batch,
    check_batch_size,
    check_unit_range,
    input_gradients,
    model_device,
    predictions,
)


def _adv_correct(
    target: nn.Module, x: Tensor, y: Tensor, craft: Callable[..., Tensor], *, seed: int, batch_size: int
) -> Tensor:
    """Per example (N,) bool: ``target`` right on ``craft(xb, yb, seed=seed + i)`` for each batch i of (x, y)."""
    out = []
    for i, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size))):
        pred = predictions(target, craft(xb, yb, seed=seed + i), batch_size=batch_size)
        out.append((pred == yb.to(pred.device)).cpu())
    return torch.cat(out)


def _adv_accuracy(
    target: nn.Module, x: Tensor, y: Tensor, craft: Callable[..., Tensor], *, seed: int, batch_size: int
) -> float:
    """Accuracy of ``target`` on ``craft(xb, yb, seed=seed + i)`` for each batch i of (x, y)."""
    return int(_adv_correct(target, x, y, craft, seed=seed, batch_size=batch_size).sum()) / x.shape[0]


RESTART_SEED_STRIDE = 100_003  # restart r of a curve seeds its batches from seed + r * stride


def _worst_case_accuracy(
    target: nn.Module, x: Tensor, y: Tensor, craft: Callable[..., Tensor], *, seed: int, batch_size: int,
    restarts: int,
) -> float:
    """Accuracy when an example counts only if it survives every one of ``restarts`` random starts."""
    correct = torch.ones(x.shape[0], dtype=torch.bool)
    for r in range(restarts):
        correct &= _adv_correct(target, x, y, craft, seed=seed + r * RESTART_SEED_STRIDE, batch_size=batch_size)
    return int(correct.sum()) / x.shape[0]


def craft_transfer(
    surrogate: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_list: Sequence[float],
    *,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    alpha: float | None = None,
) -> dict[float, Tensor]:
    """PGD examples crafted on ``surrogate`` once, to evaluate any number of targets on (transfer attacks).

    Batch i uses seed ``seed + i``, exactly as :func:`robustness_curve` crafts its ``surrogate`` attack,
    so evaluating a target on these examples gives the same transfer accuracy.

    Args:
        surrogate: The model attacked (e.g. w0, or an independently trained Ensemble).
        x: Clean inputs ``(N, *input_shape)`` in [0, 1].
        y: Labels ``(N,)``.
        eps_list: L∞ radii.

    Returns:
        ``{eps: adversarial inputs (N, *input_shape) on the CPU}``.
    """
    check_batch(x, y)
    check_unit_range(x)
    check_batch_size(batch_size)
    out = {}
    for eps in map(float, eps_list):
        parts = [pgd_attack(surrogate, xb, yb, eps, steps=steps, alpha=alpha, seed=seed + i).cpu()
                 for i, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size)))]
        out[eps] = torch.cat(parts)
    return out


def transfer_matrix(
    members: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
) -> list[list[float]]:
    """``M[i][j]``: accuracy of member j on PGD examples crafted on member i (the diagonal is white-box).

    Low off-diagonal entries mean an attack on one member breaks the others: the members are close to
    one function, and averaging them buys little robustness.

    Args:
        members: K modules mapping ``(B, *input_shape)`` in [0, 1] to logits ``(B, C)``.
        x: Clean inputs ``(N, *input_shape)`` in [0, 1].
        y: Labels ``(N,)``.
        eps: L∞ radius.

    Returns:
        K lists of K accuracies in [0, 1].
    """
    rows = []
    for src in members:
        adv = craft_transfer(src, x, y, [eps], steps=steps, seed=seed, batch_size=batch_size)[float(eps)]
        rows.append([accuracy(m, adv, y, batch_size=batch_size) for m in members])
    return rows


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
    restarts: int = 1,
    transfer_from: Mapping[str, Mapping[float, Tensor]] | None = None,
    autoattack_examples: int = 0,
    autoattack_version: str = "standard",
    alpha: float | None = None,
    strong_eps: Sequence[float] | None = None,
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
        restarts: White-box PGD random starts; an example counts as robust only if it survives all of
            them (restart r seeds batch i with ``seed + r * RESTART_SEED_STRIDE + i``; 1 = one start).
        transfer_from: ``{name: {eps: adversarial inputs (N, ...)}}`` crafted in advance on other models
            (:func:`craft_transfer`), adding a ``transfer_<name>`` column per name.
        autoattack_examples: AutoAttack on the first this many examples only (0: all); the row's
            ``autoattack_n`` says how many.
        autoattack_version: ``"standard"`` or ``"apgd"`` (its APGD-CE and APGD-T only; see
            :func:`fipray.eval.attacks.auto_attack`).
        alpha: PGD step size of both attacks (None: ``2.5 * eps / steps``).
        strong_eps: The radii at which ``restarts`` and ``autoattack`` apply (None: all); at the others the
            row has one PGD start and a NaN ``autoattack`` (the costly attacks where they matter).

    Returns:
        One row per ε, in the given order: ``{"eps", "clean", "whitebox", "transfer", "autoattack",
        "steps", "n"}`` (plus ``transfer_<name>`` and, with restarts or AutoAttack, ``restarts`` and
        ``autoattack_n``) with accuracies in [0, 1].
    """
    check_batch(x, y)
    check_unit_range(x)
    check_batch_size(batch_size)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if autoattack_examples < 0:
        raise ValueError(f"autoattack_examples must be >= 0, got {autoattack_examples}")
    n_aa = min(autoattack_examples or x.shape[0], x.shape[0])
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

    strong = None if strong_eps is None else {float(e) for e in strong_eps}
    rows = []
    for eps in map(float, eps_list):
        full = strong is None or eps in strong
        starts = restarts if full else 1
        whitebox = partial(pgd_attack, target, eps=eps, steps=steps, alpha=alpha)
        transfer = None if surrogate is None else partial(pgd_attack, surrogate, eps=eps, steps=steps, alpha=alpha)
        auto = partial(auto_attack, target, eps=eps, num_classes=num_classes, version=autoattack_version) \
            if autoattack and full else None
        row = {
            "eps": eps,
            "clean": clean,
            "whitebox": adv_acc(whitebox) if starts == 1 else _worst_case_accuracy(
                target, x, y, whitebox, seed=seed, batch_size=batch_size, restarts=starts),
            "transfer": adv_acc(transfer),
            "autoattack": adv_acc(auto) if n_aa == x.shape[0] or auto is None else _adv_accuracy(
                target, x[:n_aa], y[:n_aa], auto, seed=seed, batch_size=batch_size),
            "steps": steps,
            "n": int(x.shape[0]),
        }
        if restarts > 1 or autoattack_examples or autoattack_version != "standard":
            row |= {"restarts": starts, "autoattack_n": n_aa if auto is not None else 0}
        for name, sets in (transfer_from or {}).items():
            if eps not in sets:
                raise ValueError(f"transfer_from[{name!r}] has no examples at eps {eps}")
            row[f"transfer_{name}"] = accuracy(target, sets[eps], y, batch_size=batch_size)
        rows.append(row)
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
    - ``whitebox_le_transfer``: at every ε, white-box accuracy <= transfer accuracy + ``tol``, for the
      ``transfer`` column and every ``transfer_<name>`` column; None when no row has a transfer
      accuracy (nothing to check).
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
    # Every transfer column (w0's and those of `transfer_from`): white-box must be the stronger attack.
    checked = [(float(r["whitebox"]), float(v)) for r in ordered for k, v in r.items()
               if k.startswith("transfer") and not math.isnan(float(v))]
    wb_le_tr = all(w <= t + tol for w, t in checked) if checked else None

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


#: The flags of :func:`sanity_flags`; all but the last judge accuracies, which a smoke-size run cannot.
SANITY_FLAGS = ("acc_decreases_with_eps", "acc_near_zero_at_max_eps", "more_steps_not_better",
                "whitebox_le_transfer", "nonzero_input_gradients")
ACCURACY_FLAGS = SANITY_FLAGS[:4]
NOT_EVALUATED = "not evaluated at smoke size"


def smoke_size(examples: int, steps: int, *, tol: float = 0.01, steps_list: Sequence[int] = (10, 40)) -> str | None:
    """Why flags on ``examples`` examples of a ``steps``-step PGD curve cannot judge accuracies, or None.

    Too small (a smoke test's size): fewer than ``1 / tol`` examples (one example moves an accuracy by
    more than the flags' slack ``tol``), or a curve attacked with fewer PGD steps than the weakest attack
    the steps check compares (``min(steps_list)``: the curve's attack is too weak to be near zero or to
    beat transfer). Such flags would flip on noise; a full run's would not.
    """
    need = math.ceil(1 / tol - 1e-9)
    if examples < need:
        return f"{examples} examples < {need}: one example moves an accuracy by more than tol={tol:g}"
    if steps < min(steps_list):
        return f"{steps}-step PGD < the {min(steps_list)} steps of the weakest attack the flags compare"
    return None


def mark_not_evaluated(report: Mapping[str, dict], reason: str, flags: Sequence[str] = ACCURACY_FLAGS) -> dict:
    """:func:`sanity_flags`' ``report`` with ``flags`` set to None and ``measured["not_evaluated"]`` saying why."""
    return {"flags": {**report["flags"], **{k: None for k in flags}},
            "measured": {**report["measured"], "not_evaluated": {"reason": reason, "flags": list(flags)}}}


def flag_verdict(value: bool | None, not_evaluated: bool = False) -> str:
    """A flag's word in a report: ok, FAILED, n/a (nothing to check) or :data:`NOT_EVALUATED`."""
    if not_evaluated:
        return NOT_EVALUATED
    return "n/a" if value is None else ("ok" if value else "FAILED")
