"""A reservoir replay buffer over a whole task stream, as the DER paper's benchmarks keep one.

DER, DER++ and ER in Buzzega et al. (NeurIPS 2020, the mammoth code) share one buffer of `size`
examples across the stream: every example of every training batch is offered to it in order, and the
k-th example offered (k from 0) takes slot k while the buffer is not full, else a uniform slot with
probability size / (k + 1) (Vitter's algorithm R). The buffer is therefore always a uniform sample of
everything seen so far, and it holds examples of the *current* task too.

Which example lands in which slot at which step depends only on the order the examples are offered in
and a seeded generator, never on the network; so `ReservoirPlan.build` computes the whole stream's
insertions once per seed (a few thousand insertions for 1.2M examples), and every method that replays
(ER, DER, DER++) or keeps invariance on the buffer (FIP: the buffer as it stands when a task ends) reads
the same plan. Step g is a global step over the stream (task i's step t is `offsets[i] + t`); replay at
step g sees the buffer *before* the examples of step g are offered, as in mammoth.

`ReplayBuffer` is one method's live view of a plan: minibatches drawn without replacement from the
filled slots (seeded by (seed, g): a pure function of the step), and, for DER, the logits each
example carried when it entered the buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fipray.core.modes import eval_mode
from fipray.data.batches import mix_seed
from fipray.data.stream import Examples
from fipray.data.transformed import gather


@dataclass(frozen=True)
class ReservoirPlan:
    """Every insertion of a reservoir buffer over a stream, in order.

    Attributes:
        size: the buffer's capacity.
        offsets: global step at which each task starts (task i's step t is `offsets[i] + t`); one more
            entry at the end: the total number of steps.
        step, slot, task, index: per insertion (ascending step), the global step, the slot it fills,
            and the task and index (within that task's training examples) of the example.
        seen: examples offered before each global step (length `offsets[-1] + 1`).
    """

    size: int
    offsets: tuple[int, ...]
    step: Tensor
    slot: Tensor
    task: Tensor
    index: Tensor
    seen: Tensor

    @classmethod
    def build(cls, size: int, batches: Sequence[tuple[int, Callable[[int], Tensor]]], seed: int) -> ReservoirPlan:
        """The plan of a stream whose task i offers, at each of its `steps` steps, the examples `indices(t)`.

        Args:
            batches: per task, (steps, indices) with `indices(t)` the task's training indices of step t.
            seed: seeds the reservoir's draws (its own generator).
        """
        if size <= 0:
            raise ValueError(f"a reservoir buffer needs a positive size, got {size}")
        g = torch.Generator().manual_seed(seed)
        steps, slots, tasks, index, seen_at = [], [], [], [], [0]
        seen, gstep, offsets = 0, 0, [0]
        for task, (n_steps, indices) in enumerate(batches):
            for t in range(n_steps):
                idx = indices(t).cpu()
                rank = torch.arange(seen, seen + len(idx), dtype=torch.float64)
                u = torch.rand(len(idx), generator=g, dtype=torch.float64)
                slot = torch.where(rank < size, rank, torch.floor(u * (rank + 1))).long()
                keep = slot < size
                k = int(keep.sum())
                if k:
                    steps.append(torch.full((k,), gstep, dtype=torch.long))
                    slots.append(slot[keep])
                    tasks.append(torch.full((k,), task, dtype=torch.long))
                    index.append(idx[keep].long())
                seen += len(idx)
                gstep += 1
                seen_at.append(seen)
            offsets.append(gstep)
        return cls(size, tuple(offsets), _cat(steps), _cat(slots), _cat(tasks), _cat(index), torch.tensor(seen_at))

    def contents(self, g: int) -> tuple[Tensor, Tensor, Tensor]:
        """The buffer before step g's examples are offered: (slots, tasks, indices) of the filled slots, in
        slot order (the slot's latest insertion before g)."""
        n = int(torch.searchsorted(self.step, torch.tensor(g), right=False))
        filled = min(self.size, int(self.seen[min(g, len(self.seen) - 1)]))
        last = torch.full((self.size,), -1, dtype=torch.long)
        if n:
            last.scatter_reduce_(0, self.slot[:n], torch.arange(n), reduce="amax")
        slots = torch.arange(filled)
        k = last[:filled]
        assert bool((k >= 0).all()), "reservoir slots below the fill level must be filled"
        return slots, self.task[k], self.index[k]

    def inserted_at(self, g: int) -> tuple[Tensor, Tensor, Tensor]:
        """The insertions of step g: (slots, tasks, indices), in order (a later one may overwrite a slot)."""
        lo = int(torch.searchsorted(self.step, torch.tensor(g), right=False))
        hi = int(torch.searchsorted(self.step, torch.tensor(g), right=True))
        return self.slot[lo:hi], self.task[lo:hi], self.index[lo:hi]

    def global_step(self, task: int, t: int) -> int:
        return self.offsets[task] + t


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


class ReplayBuffer:
    """One method's view of a `ReservoirPlan`: replay minibatches, and (with `keep_logits`) the logits each
    example had when it entered the buffer (DER's dark knowledge).

    Args:
        plan: the stream's insertions.
        examples: each task's training examples as the network sees them (labels = output columns).
        seed: seeds the replay minibatches (batch of step g: a pure function of (seed, g)).
        num_outputs: width of the stored logits.
    """

    def __init__(self, plan: ReservoirPlan, examples: Sequence[Examples], seed: int, num_outputs: int = 0):
        self.plan, self.examples, self.seed = plan, list(examples), seed
        self.logits: Tensor | None = None
        self.stored = torch.zeros(plan.size, dtype=torch.bool)
        self._at: tuple[int, tuple[Tensor, Tensor, Tensor]] | None = None  # the buffer of the last step asked
        if num_outputs:
            self.logits = torch.zeros(plan.size, num_outputs, device=self.examples[0].device)

    def contents(self, g: int) -> tuple[Tensor, Tensor, Tensor]:
        """`ReservoirPlan.contents(g)`, kept for step g: DER++ draws twice from the same buffer each step."""
        if self._at is None or self._at[0] != g:
            self._at = (g, self.plan.contents(g))
        return self._at[1]

    def sample(self, g: int, n: int, draw: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """`min(n, filled)` examples of the buffer before step g, drawn without replacement: (x, y, slots,
        tasks); None while it is empty. `draw` tells independent draws of one step apart (DER++ takes two)."""
        slots, tasks, index = self.contents(g)
        if not len(slots):
            return None
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 11, g, draw))
        pick = torch.randperm(len(slots), generator=gen)[:n]
        x, y = gather(self.examples, tasks[pick], index[pick])
        return x, y, slots[pick], tasks[pick]

    @torch.no_grad()
    def store(self, model: nn.Module, g: int) -> None:
        """Record the logits of step g's insertions: the network's outputs on them now (before the step's
        update, in the mode it trains in), as DER stores `outputs.data` of the batch."""
        if self.logits is None:
            return
        slots, tasks, index = self.plan.inserted_at(g)
        if len(slots):
            x, _ = gather(self.examples, tasks, index)
            self.logits[slots.to(self.logits.device)] = model(x).float()
            self.stored[slots] = True

    @torch.no_grad()
    def fill_missing(self, model: nn.Module, g: int) -> None:
        """Logits for buffer entries present before step g whose insertion was never seen (e.g. task 0's,
        when every method starts from one base network trained elsewhere): the network's outputs now."""
        if self.logits is None:
            return
        slots, tasks, index = self.contents(g)
        miss = ~self.stored[slots]
        if bool(miss.any()):
            x, _ = gather(self.examples, tasks[miss], index[miss])
            with eval_mode(model):
                self.logits[slots[miss].to(self.logits.device)] = model(x).float()
            self.stored[slots[miss]] = True
