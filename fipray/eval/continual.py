"""Continual-learning metrics from the accuracy matrix R, and masked task accuracy.

Indices are 0-based here: with T tasks, ``R[i, j]`` is the test accuracy on task j after training
task i, so PROTOCOLS.md's "R[T, j]" (1-based, last row) is ``R[T - 1, j]`` below.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor, nn

from fipray.eval.predict import check_batch, predictions


def cl_metrics(R: np.ndarray, random_init_acc: np.ndarray | None = None) -> dict[str, float]:
    """Average accuracy, backward transfer, forgetting and forward transfer of an accuracy matrix.

    With T tasks and 0-based indices:

    - ``acc`` = mean_j R[T-1, j]
    - ``bwt`` = 1/(T-1) Σ_{j<T-1} (R[T-1, j] - R[j, j])
    - ``forgetting`` = 1/(T-1) Σ_{j<T-1} (max_{l<T-1} R[l, j] - R[T-1, j])  (Chaudhry et al. 2018)
    - ``fwt`` = 1/(T-1) Σ_{j>=1} (R[j-1, j] - b_j), b_j = accuracy of the randomly initialised model

    With a single task there is nothing to transfer or forget, so ``bwt``, ``forgetting`` and ``fwt``
    are 0.0 (not NaN) when T == 1.

    Args:
        R: Accuracy matrix, shape (T, T); ``R[i, j]`` = accuracy on task j after training task i.
            Entries above the diagonal are only read by ``fwt``.
        random_init_acc: ``b``, shape (T,): accuracy on each task of the model before any training.
            Without it ``fwt`` is NaN (unknown), except when T == 1.

    Returns:
        ``{"acc", "bwt", "forgetting", "fwt"}`` as Python floats.

    Raises:
        ValueError: ``R`` is not a non-empty square matrix, or ``random_init_acc`` is not of shape (T,).
    """
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be a square (T, T) accuracy matrix, got shape {R.shape}")
    T = R.shape[0]
    if T == 0:
        raise ValueError("R is empty (T = 0 tasks)")
    b = None
    if random_init_acc is not None:
        b = np.asarray(random_init_acc, dtype=np.float64)
        if b.shape != (T,):
            raise ValueError(
                f"random_init_acc must have shape ({T},) to match R of shape {R.shape}, got {b.shape}"
            )

    acc = float(R[-1].mean())
    if T == 1:
        return {"acc": acc, "bwt": 0.0, "forgetting": 0.0, "fwt": 0.0}

    last = R[-1, :-1]
    bwt = float(np.mean(last - np.diag(R)[:-1]))
    forgetting = float(np.mean(R[:-1, :-1].max(axis=0) - last))
    # R[j-1, j] for j >= 1 is the first superdiagonal.
    fwt = float(np.mean(np.diag(R, k=1) - b[1:])) if b is not None else float("nan")
    return {"acc": acc, "bwt": bwt, "forgetting": forgetting, "fwt": fwt}


def task_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    classes_allowed: Sequence[int] | None,
    batch_size: int = 512,
) -> float:
    """Accuracy with the argmax restricted to ``classes_allowed``.

    Class-incremental evaluation passes every class seen so far; task-incremental evaluation passes
    the task's own classes; None allows all classes. The model is evaluated in eval mode under
    ``torch.no_grad``; every submodule's training flag is restored afterwards.

    Args:
        model: Maps ``(B, *input_shape)`` to logits ``(B, C)``.
        x: Inputs ``(N, *input_shape)``.
        y: Labels ``(N,)``, each one of ``classes_allowed``.
        classes_allowed: Class indices in ``[0, C)`` the prediction may take; None = all C classes.
        batch_size: Examples per forward pass.

    Returns:
        Fraction of correct predictions, in [0, 1].

    Raises:
        ValueError: empty or mismatched ``x``/``y``, empty ``classes_allowed``, or a label outside
            ``classes_allowed`` (it could never be predicted, so the number would be meaningless).
    """
    check_batch(x, y)
    if classes_allowed is not None:
        allowed = sorted({int(c) for c in classes_allowed})
        if not allowed:
            raise ValueError("classes_allowed is empty")
        if allowed[0] < 0:
            raise ValueError(f"classes_allowed holds a negative class index {allowed[0]}")
        stray = sorted(set(y.unique().tolist()) - set(allowed))
        if stray:
            raise ValueError(f"labels {stray[:10]} are not in classes_allowed {allowed[:20]}")
        classes_allowed = allowed
    pred = predictions(model, x, classes_allowed=classes_allowed, batch_size=batch_size)
    return int((pred == y.to(pred.device)).sum()) / y.shape[0]
