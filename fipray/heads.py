"""Output-head layouts of a continual run: which output columns each task owns, and how losses and the
invariance distance read them.

- ``shared``: one head over one label space; every column always live (labels are columns). Today's
  split-digits setting, and domain streams.
- ``multi``: one head per task (its own block of columns). A task's loss is the softmax over its own
  block; invariance keeps every earlier task's head, block by block, on the replay memory; task-incremental
  evaluation reads the example's own block.
- ``grow``: one head whose output nodes are appended as tasks bring new classes (the paper's Methods).
  All nodes exist from the start, but a node takes part in no loss and no output until its task arrives,
  so the network at task i is exactly one with the nodes of tasks <= i appended (each initialised at its
  untouched initial weights). Invariance compares the nodes the anchor network had.

- ``union``: one head over the union of the tasks' label spaces, each task's labels shifted past the
  earlier tasks' (MNIST 0-9, then Fashion-MNIST 10-19: the FIP paper's two-dataset demo). Every column
  is live from the start, as with ``shared``: losses are the softmax over all of them and invariance keeps
  the whole output, so an old task's inputs stay away from the new task's columns too.

Columns are laid out task by task for ``multi``, ``union`` and for ``grow`` over per-task label spaces; over a shared
label space (class splits, domains) ``grow`` keeps label = column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LAYOUTS = ("shared", "multi", "grow", "union")

Distance = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Head:
    """The output columns of each task, under one layout.

    Attributes:
        layout: "shared", "multi", "grow" or "union".
        blocks: the output columns of each task, in task order.
        num_outputs: the network's output width.
    """

    layout: str
    blocks: tuple[tuple[int, ...], ...]
    num_outputs: int

    @classmethod
    def build(cls, layout: str, task_classes: list[tuple[int, ...]], shared_labels: bool,
              num_labels: int) -> tuple[Head, list[dict[int, int]]]:
        """The head, and per task the map label -> output column.

        Raises:
            ValueError: an unknown layout, or `shared` over tasks that each have their own label space.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"head layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if layout == "shared" or (layout == "grow" and shared_labels):
            if not shared_labels:
                raise ValueError("head 'shared' needs one label space for all tasks; tasks with their own "
                                 "label spaces (a datasets stream) need head 'multi', 'grow' or 'union'")
            maps = [{c: c for c in cl} for cl in task_classes]
            return cls(layout, tuple(tuple(cl) for cl in task_classes), num_labels), maps
        if layout == "union" and shared_labels:
            raise ValueError("head 'union' joins tasks' own label spaces (a datasets stream); tasks that share "
                             "one label space need head 'shared'")
        maps, blocks, off = [], [], 0
        for cl in task_classes:
            maps.append({c: off + k for k, c in enumerate(cl)})
            blocks.append(tuple(range(off, off + len(cl))))
            off += len(cl)
        return cls(layout, tuple(blocks), off), maps

    # Columns ------------------------------------------------------------------------------------------
    @property
    def all_live(self) -> bool:
        """Every column takes part in every loss and in the invariance (`shared`, `union`)."""
        return self.layout in ("shared", "union")

    def live(self, upto: int) -> list[int]:
        """The columns that exist once tasks 0..upto have arrived (every column for `shared`, `union`)."""
        if self.all_live:
            return list(range(self.num_outputs))
        return sorted({c for b in self.blocks[: upto + 1] for c in b})

    def _block_of(self, device: torch.device) -> Tensor:
        ids = torch.full((self.num_outputs,), -1, dtype=torch.long)
        for k, b in enumerate(self.blocks):
            ids[list(b)] = k
        return ids.to(device)

    def mask(self, y: Tensor, task: int) -> Tensor | None:
        """Which logits of each example take part in a loss while task `task` is learned: (B, C) or (C,)
        bool, None for all of them."""
        if self.all_live:
            return None
        if self.layout == "grow":
            m = torch.zeros(self.num_outputs, dtype=torch.bool, device=y.device)
            m[self.live(task)] = True
            return m
        ids = self._block_of(y.device)
        return ids[None, :] == ids[y][:, None]

    # Losses -------------------------------------------------------------------------------------------
    def cross_entropy(self, logits: Tensor, y: Tensor, task: int) -> Tensor:
        """Cross-entropy over the columns live for each example (its block for `multi`, the nodes of tasks
        <= `task` for `grow`); exactly `F.cross_entropy` for `shared`."""
        m = self.mask(y, task)
        if m is None:
            return F.cross_entropy(logits, y)
        return F.cross_entropy(logits.masked_fill(~m, float("-inf")), y)

    def loss(self, task: int) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda logits, y: self.cross_entropy(logits, y, task)

    def invariance(self, distance: Distance, task: int) -> Distance | None:
        """The distance the FIP phase of task `task` keeps small against the anchor (the network after
        task−1): the full outputs (`shared`, returned as None: the phase's own distance), the anchor's
        nodes (`grow`), or each earlier task's head in turn, averaged (`multi`)."""
        if self.all_live:
            return None
        if self.layout == "grow":
            cols = torch.tensor(self.live(task - 1))

            def grown(logits: Tensor, anchor: Tensor) -> Tensor:
                c = cols.to(logits.device)
                return distance(logits.index_select(-1, c), anchor.index_select(-1, c))

            return grown
        olds = [torch.tensor(b) for b in self.blocks[:task]]

        def per_head(logits: Tensor, anchor: Tensor) -> Tensor:
            total = logits.new_zeros(())
            for b in olds:
                c = b.to(logits.device)
                total = total + distance(logits.index_select(-1, c), anchor.index_select(-1, c))
            return total / len(olds)

        return per_head

    def old_columns(self, task: int) -> list[int]:
        """The columns the network had before task `task` (what distillation and logit replay compare)."""
        return self.live(task - 1)
