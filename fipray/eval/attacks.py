"""Adversarial attacks, for evaluation and for training, in one place.

Evaluation (torchattacks): :func:`pgd_attack`, :func:`fgsm_attack` and :func:`auto_attack` on a deployed
model in eval mode, their random start drawn from a seeded, forked RNG so that evaluation never perturbs
training randomness (:mod:`fipray.eval.robustness` builds its curves and flags on them).

Training: :func:`pgd_examples`, the L∞ PGD that crafts each training batch of an adversarial objective
(the robust FIP's L, PGD adversarial training), its radius, step size and steps given as arguments and its
random start drawn from a CPU generator of the caller's; :func:`input_gradient`, ∇_x CE that can stay in the
graph (diversity and coherence objectives, FGSM output shifts).

Attacked models return logits or log-probabilities; inputs lie in [0, 1] (normalisation lives inside the
model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fipray.core.modes import eval_mode
from fipray.eval.predict import check_batch, check_unit_range, model_device


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


AUTOATTACK_VERSIONS = ("standard", "apgd")


def auto_attack(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, num_classes: int, seed: int, version: str = "standard"
) -> Tensor:
    """torchattacks' AutoAttack at L∞ radius ``eps``.

    ``version="standard"``: torchattacks' standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square with 5000
    queries). ``"apgd"``: its two gradient attacks only, built exactly as the standard version builds them
    (APGD-CE and APGD-T, one restart each), without FAB-T and Square — the black-box Square attack is what
    catches gradient masking, and also what makes the standard version cost minutes per ε on a CPU.
    """
    import torchattacks

    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"AutoAttack version {version!r}: expected one of {AUTOATTACK_VERSIONS}")
    if eps == 0:
        return x.detach().clone().to(model_device(model, x.device))
    if x.ndim != 4:
        wrapped = _AsImage(model, x.shape[1:])
        adv = auto_attack(
            wrapped, x.reshape(x.shape[0], 1, 1, -1), y, eps=eps, num_classes=num_classes, seed=seed,
            version=version,
        )
        return adv.reshape(x.shape)
    if version == "apgd":
        attack = torchattacks.MultiAttack([
            torchattacks.APGD(model, norm="Linf", eps=eps, seed=seed, loss="ce", n_restarts=1),
            torchattacks.APGDT(model, norm="Linf", eps=eps, seed=seed, n_classes=num_classes, n_restarts=1),
        ])
    else:
        attack = torchattacks.AutoAttack(
            model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed
        )
    return _run_attack(attack, model, x, y, seed)


def input_gradient(logits_fn: Callable[..., Tensor], x: Tensor, y: Tensor, create_graph: bool = False) -> Tensor:
    """∇_x CE(f(x), y), (B, *input_shape)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(logits_fn(x), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return g


def pgd_examples(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int,
                 generator: torch.Generator, clean_logits: Tensor | None = None) -> Tensor:
    """L∞ PGD with a uniform random start in the ε-ball, crafted on `model` in eval mode: (B, ...) in [0, 1].

    `steps` steps of size `step_size` within radius `eps`. Maximises cross-entropy, or with `clean_logits`
    KL(softmax(clean_logits) ‖ softmax(f(x'))) (TRADES). Only the input gets gradients; the random start
    draws from `generator` (CPU), so crafting never touches torch's global RNG and a resumed path crafts
    the same examples.
    """
    noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1).to(x.device)
    x_adv = (x + eps * noise).clamp(0, 1).detach()
    target = None if clean_logits is None else F.softmax(clean_logits.detach(), dim=1)
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            out = model(x_adv)
            loss = F.cross_entropy(out, y, reduction="sum") if target is None else \
                F.kl_div(F.log_softmax(out, dim=1), target, reduction="sum")
            (g,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + step_size * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()
