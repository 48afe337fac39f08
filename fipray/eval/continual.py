"""Continual-learning evaluation: masked task accuracy, rows of the accuracy matrix R, the CL metrics
computed from R, and the weight-change analysis of a continual run (the paper's Fig. 3e).

Indices are 0-based here: with T tasks, ``R[i, j]`` is the test accuracy on task j after training
task i, so PROTOCOLS.md's "R[T, j]" (1-based, last row) is ``R[T - 1, j]`` below. A row of R is computed
in both settings at once: class-incremental (argmax over every class seen so far) and task-incremental
(argmax over the task's own classes). FIP's phases and every baseline's end with the same row
(`row_finish`), so all methods are evaluated alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fipray.core.modes import eval_mode
from fipray.data.memory import TaskTensors
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


# Rows of the accuracy matrix R --------------------------------------------------------------------------
def seen_classes(tasks: list[TaskTensors], upto: int) -> list[int]:
    """The output columns of tasks 0..upto (what class-incremental evaluation may predict after task upto)."""
    return [c for t in tasks[: upto + 1] for c in t.classes]


def evaluate_row(model: nn.Module, tasks: list[TaskTensors], trained_upto: int) -> dict[str, list[float]]:
    """Row `trained_upto` of the accuracy matrix R in both settings.

    Class-incremental: argmax over all classes seen so far (tasks ≤ max(trained_upto, j) for
    task j, so forward-transfer entries j > trained_upto are defined). Task-incremental:
    argmax over task j's own classes.
    """
    cls, tsk = [], []
    for j, t in enumerate(tasks):
        c, k = test_accuracies(model, t, [seen_classes(tasks, max(trained_upto, j)), list(t.classes)])
        cls.append(c)
        tsk.append(k)
    return {"class": cls, "task": tsk}


def test_accuracies(model: nn.Module, task: TaskTensors, allowed: list[Sequence[int]]) -> list[float]:
    """`accuracies` on a task's test split: its tensors when held in memory, else its streamed batches
    (`task.test_split`: one batch of inputs in memory; exact counts, so the same numbers for the same
    predictions)."""
    if task.test_split is None:
        return accuracies(model, *task.test_tensors(), allowed)
    correct, total = [0] * len(allowed), 0
    for x, y in task.test_split.batches():
        with torch.no_grad(), eval_mode(model):
            logits = model(x)
        for k, n in enumerate(_correct(logits, y, allowed)):
            correct[k] += n
        total += len(y)
    if total == 0:
        raise ValueError(f"task {task.index}'s test split is empty")
    return [c / total for c in correct]


def _correct(logits: Tensor, y: Tensor, allowed: list[Sequence[int]]) -> list[int]:
    """Correct predictions of `logits` against `y` with the argmax restricted to each set of `allowed`."""
    out = []
    for classes in allowed:
        stray = sorted(set(y.unique().tolist()) - {int(c) for c in classes})  # as task_accuracy checks
        if stray:
            raise ValueError(f"labels {stray[:10]} are not in classes_allowed {sorted(classes)[:20]}")
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)] = True
        pred = logits.masked_fill(~keep, float("-inf")).argmax(dim=-1)
        out.append(int((pred == y.to(pred.device)).sum()))
    return out


@torch.no_grad()
def accuracies(model: nn.Module, x: Tensor, y: Tensor, allowed: list[Sequence[int]],
               batch_size: int = 512) -> list[float]:
    """`task_accuracy` for several sets of allowed classes from one forward pass over `x` (the same
    batches, so the same numbers as one `task_accuracy` call per set)."""
    with eval_mode(model):
        logits = torch.cat([model(xb) for xb in x.split(batch_size)])
    return [n / y.shape[0] for n in _correct(logits, y, allowed)]


def heldout_inputs(tasks: list[TaskTensors], n: int) -> Tensor:
    """The first `n` test inputs of the stream, task after task (the held-out inputs whose output drift a
    path records), read only from the tasks that hold them."""
    parts, left = [], n
    for t in tasks:
        if left <= 0:
            break
        parts.append(t.test_split.head(left)[0] if t.test_split is not None else t.test_tensors()[0][:left])
        left -= len(parts[-1])
    if not parts:  # n = 0: no held-out inputs, shaped like the stream's
        t = tasks[0]
        return (t.test_split.head(1)[0] if t.test_split is not None else t.test_tensors()[0])[:0]
    return torch.cat(parts)


def row_finish(tasks: list[TaskTensors], i: int) -> Callable[[nn.Module, dict[str, Any]], dict]:
    """A phase's `finish` (model, phase state) -> row i of the accuracy matrix R, in both settings."""
    return lambda model, state: evaluate_row(model, tasks, i)


def random_rows(base: nn.Module, tasks: list[TaskTensors]) -> dict[str, list[float]]:
    """Accuracies of the untrained network (the FWT reference), per setting."""
    return {"class": [_one_accuracy(base, t, seen_classes(tasks, j)) for j, t in enumerate(tasks)],
            "task": [_one_accuracy(base, t, list(t.classes)) for t in tasks]}


def _one_accuracy(model: nn.Module, task: TaskTensors, allowed: Sequence[int]) -> float:
    """`task_accuracy` on a task's test split, held in memory or streamed."""
    if task.test_split is None:
        return task_accuracy(model, *task.test_tensors(), allowed)
    return test_accuracies(model, task, [allowed])[0]


def metrics_so_far(R_rows: dict[int, dict[str, list[float]]], rand_class: list[float], i: int) -> dict[str, float]:
    """After task i, over tasks 0..i: class- and task-incremental average accuracy (row i of R) and the
    class-incremental BWT (`rand_class`: the untrained network's class-incremental accuracies)."""
    R = np.array([R_rows[r]["class"][: i + 1] for r in range(i + 1)])
    return {"class": float(np.mean(R[i])), "task": float(np.mean(R_rows[i]["task"][: i + 1])),
            "bwt": cl_metrics(R, np.array(rand_class[: i + 1]))["bwt"]}


def final_row(matrix_rows: list[dict], method: str, T: int) -> list[float]:
    """R[T−1, j] for each task j in the task-incremental setting, averaged over the seeds of `matrix_rows`
    (rows as `result_rows` writes them)."""
    R = [r for r in matrix_rows if r["method"] == method and r["setting"] == "task" and r["i"] == T - 1]
    return [float(np.mean([r["acc"] for r in R if r["j"] == j])) for j in range(T)]


def accuracy_along_path(tasks: list[TaskTensors]) -> Callable[[nn.Module], dict]:
    """Record-row metrics: class-incremental accuracy on every task's test set (over all classes)."""
    every = sorted({c for t in tasks for c in t.classes})

    def evaluate(model: nn.Module) -> dict:
        return {f"acc_task{j}": _one_accuracy(model, t, every) for j, t in enumerate(tasks)}

    return evaluate


def result_rows(R_rows: dict[int, dict[str, list[float]]], rand: dict[str, list[float]], keys: dict[str, Any],
                info: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Result rows (the CL metrics, then `info`) and accuracy-matrix rows of one method and seed, both
    settings, every row starting with `keys` and the setting.

    Args:
        R_rows: row i of R (`evaluate_row`) for i = 0..T−1.
        rand: the untrained network's accuracies (`random_rows`), also written as matrix row i = −1.
    """
    results, matrices = [], []
    T = len(R_rows)
    for setting in ("class", "task"):
        R = np.array([R_rows[i][setting] for i in range(T)])
        m = cl_metrics(R, np.array(rand[setting]))
        results.append({**keys, "setting": setting, **m, **info})
        matrices += [{**keys, "setting": setting, "i": i, "j": j, "acc": float(R[i, j])}
                     for i in range(T) for j in range(T)]
        matrices += [{**keys, "setting": setting, "i": -1, "j": j, "acc": float(rand[setting][j])} for j in range(T)]
    return results, matrices


# Weight-change analysis (the paper's Fig. 3e) ----------------------------------------------------------
def layer_of(name: str) -> str:
    """A parameter's layer for the per-layer table: its module path cut after the first numeric index
    (a transformer block `...encoder.layer.3`, an MLP's `3`), else its module path."""
    parts = name.split(".")[:-1] or [name]
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: k + 1])
    return ".".join(parts)


def weight_change(w0: dict[str, Tensor], model: nn.Module) -> dict[str, float]:
    """Per layer ‖ΔW‖F / ‖W0‖F between the start of the continual phases (w0) and `model`, plus 'all'."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for name, p in model.named_parameters():
        if name not in w0:
            continue
        layer = layer_of(name)
        d = (p.detach().float() - w0[name].float()).pow(2).sum().item()
        n = w0[name].float().pow(2).sum().item()
        for key in (layer, "all"):
            num[key] = num.get(key, 0.0) + d
            den[key] = den.get(key, 0.0) + n
    return {k: float(np.sqrt(num[k] / den[k])) if den[k] > 0 else float("nan") for k in num}


def mean_weight_change(rows: list[dict], method: str) -> dict[str, float]:
    """`weight_change` per layer averaged over seeds; `rows`: {method, seed, layer, ratio} dicts."""
    sel = [r for r in rows if r["method"] == method]
    layers = list(dict.fromkeys(r["layer"] for r in sel))
    return {k: float(np.mean([r["ratio"] for r in sel if r["layer"] == k])) for k in layers}


def weight_pca(paths: dict[str, list[np.ndarray]], start: np.ndarray) -> dict[str, np.ndarray]:
    """Every method's path (start -> its snapshots) in the plane of the top two principal components of
    all snapshots (centred at their mean, the common start included)."""
    names = list(paths)
    X = np.stack([start] + [r for m in names for r in paths[m]]).astype(np.float64)
    mean = X.mean(0)
    _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
    comps = vt[:2]
    if len(comps) < 2:  # one snapshot besides the start (a path of a record or two): the second axis is 0
        comps = np.vstack([comps, np.zeros((2 - len(comps), X.shape[1]))])
    out, k = {}, 1
    s = (start - mean) @ comps.T
    for m in names:
        n = len(paths[m])
        out[m] = np.vstack([s, (X[k:k + n] - mean) @ comps.T])
        k += n
    return out


class WeightSnapshots:
    """Weights along a method's path at every record, on a seeded subset of coordinates (for the PCA).

    Called as a record-row metric it stores a snapshot and adds no column. `flat` gives a network's
    weights as one vector (e.g. only the trainable ones, or LoRA's merged weights).
    """

    def __init__(self, n: int, keep: int, flat: Callable[[nn.Module], Tensor]):
        self.flat = flat
        g = torch.Generator().manual_seed(0)
        self.idx = torch.randperm(n, generator=g)[:keep].sort().values if n > keep else None
        self.rows: list[np.ndarray] = []

    def take(self, model: nn.Module) -> np.ndarray:
        w = self.flat(model).detach().float().cpu()
        return (w if self.idx is None else w[self.idx]).numpy()

    def __call__(self, model: nn.Module) -> dict:
        self.rows.append(self.take(model))
        return {}
