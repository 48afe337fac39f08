"""An ensemble of networks sampled along functionally invariant paths, with a log(mean softmax) head.

The head returns log-probabilities rather than probabilities on purpose (PROTOCOLS.md): an attack
that applies cross-entropy to probabilities sees flattened gradients and reports fake robustness,
while cross-entropy on log-probabilities is exact because ``log_softmax(log p) = log p``.

Members whose architecture is a (nested) ``nn.Sequential`` of Linear / Conv2d / pooling / Flatten /
elementwise layers run *fused*: their weights are stacked once, the first layer sees the shared input
through one wide matmul or convolution, later convolutions become one grouped convolution with K
groups and later Linear layers one batched matmul. ``benchmarks/bench_serve.py`` measures the fused
forward against a Python loop over members and ``torch.func`` vmap (numbers in
``benchmarks/results/bench_serve.txt``): fused wins at small batches (serving), vmap never wins on
CPU, and on large CPU batches the loop is as fast or faster (a K-group convolution clearly loses), so
CPU batches over ``CPU_FUSED_MAX_BATCH`` take the loop. Other architectures (BatchNorm, timm,
transformers) always use the loop. GPUs always take the fused path (not measured here).
The stacked copy is rebuilt whenever a member tensor changes (tensor version counters), and while
autograd tracks member parameters it is rebuilt differentiably on every call, so gradients with
respect to member weights stay exact. The cached copy costs memory: about once more the members'
weights (twice for Linear layers after the first, kept pre-transposed for the batched matmul).

Saving and loading (the ensemble folder format) live in :mod:`fipray.ensemble_folder`.
"""

from __future__ import annotations

import math
import threading
import typing
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

CPU_FUSED_MAX_BATCH = 32  # larger CPU batches use the loop (see Ensemble.__init__)
_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Identity, nn.Dropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class _Unfusable(Exception):
    """Raised inside the fused forward when a layer meets a layout it cannot handle."""


def _flat_layers(module: nn.Module) -> list[nn.Module] | None:
    """The layers of a nested ``nn.Sequential`` the fused forward supports, or None."""
    if type(module) is nn.Sequential:
        out: list[nn.Module] = []
        for child in module:
            sub = _flat_layers(child)
            if sub is None:
                return None
            out += sub
        return out
    if type(module) is nn.Linear:
        return [module]
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        return [module]
    if type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
        return [module]
    if isinstance(module, _ELEMENTWISE + _POOLS) and not list(module.parameters()):
        return [module]
    return None


def _fusion_plan(members: Sequence[nn.Module]) -> list[list[nn.Module]] | None:
    """Per-position layer lists (``plan[i][k]`` = layer i of member k) when every member is fusable.

    Members must agree on every layer's type and hyper-parameters (``extra_repr``), not just on
    tensor shapes: a different stride or activation would otherwise be silently replaced by member 0's.
    """
    per_member = [_flat_layers(m) for m in members]
    if any(layers is None for layers in per_member):
        return None
    ref = per_member[0]
    assert ref is not None
    for layers in per_member[1:]:
        assert layers is not None
        if len(layers) != len(ref) or any(
            type(a) is not type(b) or a.extra_repr() != b.extra_repr() for a, b in zip(layers, ref)
        ):
            return None
    if not any(isinstance(layer, (nn.Linear, nn.Conv2d)) for layer in ref):
        return None
    return [list(col) for col in zip(*per_member)]  # type: ignore[arg-type]


class Ensemble(nn.Module):
    """Average of member predictions in probability space, returned as log-probabilities.

    Members are held by reference (not copied) and put in eval mode, where they stay: ``train()`` only
    sets the ensemble's own flag, because the protocol evaluates and attacks members in eval mode.

    Args:
        members: K >= 1 modules of identical architecture (same class, same state-dict names and
            shapes), each mapping ``(B, *input_shape)`` to logits ``(B, C)``.
        fused: Evaluate all members in one fused pass when their architecture allows it (see the
            module docstring); False forces the plain loop over members.

    Raises:
        ValueError: no members, or members whose architectures differ.
    """

    def __init__(self, members: Sequence[nn.Module], *, fused: bool = True):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("an Ensemble needs at least one member")
        ref_type = type(members[0])
        ref = {k: tuple(v.shape) for k, v in members[0].state_dict().items()}
        for k, m in enumerate(members[1:], start=1):
            if type(m) is not ref_type:
                raise ValueError(f"member {k} is a {type(m).__name__}, member 0 a {ref_type.__name__}")
            shapes = {n: tuple(v.shape) for n, v in m.state_dict().items()}
            if shapes != ref:
                diff = sorted(set(shapes.items()) ^ set(ref.items()))[:3]
                raise ValueError(f"member {k} differs in architecture from member 0, e.g. {diff}")
        self.members = nn.ModuleList(members)
        # Plain attributes, not submodules: the plan references the members' own layers.
        self._plan = _fusion_plan(members) if fused else None
        # The layers are listed once; their tensors are read live from `_parameters` on every call
        # (cheap), so reassigned parameters and torch.func.functional_call's swaps are seen too.
        self._fused_params = (
            [] if self._plan is None else [m._parameters for col in self._plan for m in col if m._parameters]
        )
        self._stack_key: tuple | None = None
        self._stack: list[tuple[Tensor, Tensor | None] | None] = []
        self._stack_t: dict[int, tuple[Tensor, Tensor]] = {}
        self._frozen = False
        # Linear-only members (MLPs) have a lean no-grad path (`_mlp_log_prob_sum`) with reused output
        # buffers, kept per (thread, buffer slot) in `_work`.
        self._mlp = (
            self._plan is not None
            and all(isinstance(col[0], (nn.Linear, nn.Flatten) + _ELEMENTWISE) for col in self._plan)
            and type(self._plan[-1][0]) is nn.Linear
        )
        # Inputs of rank > 2 reach the first Linear flattened only where a Flatten precedes it.
        plan = self._plan or []
        self._mlp_flattens = self._mlp and any(
            isinstance(col[0], nn.Flatten) for col in plan[: [type(c[0]) for c in plan].index(nn.Linear)]
        )
        self._work: dict[tuple, Tensor] = {}
        self._steps: tuple[list, list[tuple[Tensor | None, Tensor | None, nn.Module | None]]] | None = None
        # Fusing removes per-member Python and dispatch overhead, which dominates small batches; on
        # large CPU batches the arithmetic dominates and K plain GEMMs / convolutions are as fast or
        # faster than one batched matmul / K-group convolution (bench_serve.py, 10 members, 1 thread,
        # fused/loop: 0.43-0.49 at batch 1; 1.1-1.25 (MLP) and 1.4-1.55 (CNN) at batch 256).
        self._cpu_fused_max_batch: float = CPU_FUSED_MAX_BATCH
        self.train(False)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def fused(self) -> bool:
        """Whether the members are evaluated in one fused pass (False: a loop over members)."""
        return self._plan is not None

    def freeze(self) -> Ensemble:
        """Promise that the members' weights never change again (a server's shards); returns self.

        Members stop requiring gradients (input gradients still work), and the stacked copy of the
        weights is no longer checked against the members on every call, which is ~30 µs of a
        ~200 µs batch-1 forward of ten MLPs. Changing a member afterwards is not seen: build a new
        Ensemble instead.
        """
        self.requires_grad_(False)
        self._frozen = True
        return self

    def train(self, mode: bool = True) -> Ensemble:
        """Set the ensemble's own training flag; members stay in eval mode whatever ``mode`` is."""
        self.training = mode
        for m in self.members:
            m.eval()
        return self

    def _stacked(self) -> list[tuple[Tensor, Tensor | None] | None]:
        """Per layer, the members' weights stacked ``(K, ...)`` and biases ``(K, out)`` (None: no params).

        Cached while no member tensor changes (data pointer and in-place version counter) and autograd
        does not track member weights; otherwise stacked afresh, differentiably.
        """
        assert self._plan is not None
        if self._frozen and self._stack_key is not None:
            return self._stack
        params = [t for d in self._fused_params for t in d.values() if t is not None]
        track = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if not track:
            key = tuple([p._version for p in params] + [p.data_ptr() for p in params])
            if key == self._stack_key:
                return self._stack
        stack: list[tuple[Tensor, Tensor | None] | None] = []
        for col in self._plan:
            layer = col[0]
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                w = torch.stack([typing.cast(Tensor, m.weight) for m in col])
                b = None if layer.bias is None else torch.stack([typing.cast(Tensor, m.bias) for m in col])
                if not track:
                    w, b = w.detach(), None if b is None else b.detach()
                stack.append((w, b))
            else:
                stack.append(None)
        if not track:
            self._stack_key, self._stack = key, stack
        return stack

    def _transposed(self, i: int, w: Tensor) -> Tensor:
        """``w`` ``(K, out, in)`` as ``(K, in, out)``; contiguous (and cached) for the cached stack, where
        batched matmuls on a transposed view measured ~1.5x slower at batch 1."""
        if w.requires_grad:
            return w.transpose(1, 2)
        wt = self._stack_t.get(i)
        if wt is None or wt[0] is not w:
            wt = (w, w.transpose(1, 2).contiguous())
            self._stack_t[i] = wt
        return wt[1]

    def _fused_logits(self, x: Tensor) -> Tensor:
        # Layouts: "shared" (B, ...) is the same input for every member; "chan" (B, K*C, H, W) holds
        # member k's channels in block k; "flat" (K, B, F) holds member k's features in row k.
        assert self._plan is not None
        K, B = len(self.members), x.shape[0]
        h, mode = x, "shared"
        for i, (col, wb) in enumerate(zip(self._plan, self._stacked())):
            layer = col[0]
            if isinstance(layer, nn.Conv2d):
                assert wb is not None
                w, b = wb
                w = w.reshape(-1, *w.shape[2:])  # (K*out, in/groups, kh, kw)
                bias = None if b is None else b.reshape(-1)
                if mode == "shared" and layer.groups == 1 and h.ndim == 4:
                    groups = 1
                elif mode == "chan":
                    groups = K * layer.groups
                else:
                    raise _Unfusable(f"Conv2d on a {mode} input of rank {h.ndim}")
                h = F.conv2d(h, w, bias, layer.stride, layer.padding, layer.dilation, groups)
                mode = "chan"
            elif isinstance(layer, nn.Linear):
                assert wb is not None
                w, b = wb  # (K, out, in), (K, out)
                if mode == "shared" and h.ndim == 2:
                    out = F.linear(h, w.reshape(-1, w.shape[-1]), None if b is None else b.reshape(-1))
                    h = out.view(B, K, -1).transpose(0, 1)
                elif mode == "flat":
                    wt = self._transposed(i, w)
                    h = torch.bmm(h, wt) if b is None else torch.baddbmm(b.unsqueeze(1), h, wt)
                else:
                    raise _Unfusable(f"Linear on a {mode} input of rank {h.ndim}")
                mode = "flat"
            elif isinstance(layer, nn.Flatten):
                if mode == "chan":
                    h, mode = h.reshape(B, K, -1).transpose(0, 1), "flat"
                elif mode == "shared":
                    h = h.flatten(1)
            else:
                if mode == "flat" and isinstance(layer, _POOLS):
                    raise _Unfusable("pooling after the member axis moved to the front")
                h = layer(h)
        if mode == "shared":
            h = h.unsqueeze(0).expand(K, *h.shape)
        elif mode == "chan":
            raise _Unfusable("the network ends in a convolution, not in (B, C) logits")
        return h

    def member_logits(self, x: Tensor) -> Tensor:
        """Outputs of every member.

        Args:
            x: Inputs ``(B, *input_shape)``.

        Returns:
            Logits ``(K, B, C)``.
        """
        if self._plan is not None and not (x.shape[0] > self._cpu_fused_max_batch and x.device.type == "cpu"):
            try:
                return self._fused_logits(x)
            except _Unfusable:
                # A layout the plan cannot express (e.g. Linear on a 3-D input): use the loop from now on.
                self._plan, self._fused_params, self._stack_key, self._stack, self._stack_t = None, [], None, [], {}
                self._mlp = False
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: Tensor) -> Tensor:
        """log(mean_k softmax(f_k(x))), computed stably as logsumexp_k(log_softmax f_k(x)) - log K.

        Args:
            x: Inputs ``(B, *input_shape)``.

        Returns:
            Log-probabilities ``(B, C)``; ``exp`` of each row sums to 1.
        """
        out = self.log_prob_sum(x)
        # Without autograd the sum is a fresh tensor of this call: subtract in place (same values).
        return out - math.log(len(self.members)) if out.requires_grad else out.sub_(math.log(len(self.members)))

    def log_prob_sum(self, x: Tensor) -> Tensor:
        """log Σ_k softmax(f_k(x)) ``(B, C)``: the sum over members, not the mean (``forward`` subtracts
        log K); what each shard of a sharded ensemble returns."""
        if self._mlp_fast(x):
            return self._mlp_log_prob_sum(x)
        return torch.logsumexp(torch.log_softmax(self.member_logits(x), dim=-1), dim=0)

    def _mlp_fast(self, x: Tensor) -> bool:
        return (
            self._mlp and not torch.is_grad_enabled() and x.device.type == "cpu"
            and (x.ndim == 2 or self._mlp_flattens)
        )

    def _buffer(self, slot: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous ``shape`` tensor that this thread's next calls reuse (the ``slot``-th buffer).

        One flat buffer per (thread, slot), grown to the largest size asked for; smaller shapes use its
        front (views cached by shape). The next call overwrites it, so only values consumed within one
        call may live there. Fresh multi-megabyte outputs cost page faults on every call: a fifth of a
        batch-256 forward of ten MLPs, measured.
        """
        key = (threading.get_ident(), slot, shape, like.dtype)
        view = self._work.get(key)
        if view is not None:
            return view
        flat_key = (key[0], slot, None, like.dtype)
        n = math.prod(shape)
        buf = self._work.get(flat_key)
        if buf is None or buf.numel() < n:
            if len(self._work) > 256:  # threads and shapes come and go: start over
                self._work.clear()
            buf = self._work[flat_key] = torch.empty(n, dtype=like.dtype)
            for k in [k for k in self._work if k[:2] == key[:2] and k[2] is not None and k[3] == like.dtype]:
                del self._work[k]  # views of the replaced buffer
        view = self._work[key] = buf[:n].view(shape)
        return view

    def _mlp_steps(self) -> list[tuple[Tensor | None, Tensor | None, nn.Module | None]]:
        """The small-batch MLP forward as ``(weight, bias, layer)`` steps over the cached stack.

        Linear steps hold the weights pre-transposed and contiguous: the first layer (shared input)
        ``(in, K*out)`` with bias ``(K*out,)``, later ones ``(K, in, out)`` with bias ``(K, 1, out)``
        (a transposed view costs 2x at batch 1). Other steps hold the layer; ``None`` marks an
        in-place ReLU and Flatten is dropped (inputs are flattened first).
        """
        stack = self._stacked()
        if self._steps is not None and self._steps[0] is stack:
            return self._steps[1]
        assert self._plan is not None
        steps: list[tuple[Tensor | None, Tensor | None, nn.Module | None]] = []
        first = True
        for col, wb in zip(self._plan, stack):
            layer = col[0]
            if wb is not None:
                w, b = wb
                if first:
                    wt = w.reshape(-1, w.shape[-1]).t().contiguous()
                    steps.append((wt, None if b is None else b.reshape(-1), None))
                    first = False
                else:
                    steps.append((w.transpose(1, 2).contiguous(), None if b is None else b.unsqueeze(1), None))
            elif type(layer) is nn.ReLU and not first:
                steps.append((None, None, None))
            elif not isinstance(layer, nn.Flatten):
                steps.append((None, None, layer))
        self._steps = (stack, steps)
        return steps

    def _mlp_log_prob_sum(self, x: Tensor) -> Tensor:
        """``log_prob_sum`` of Linear-only members without autograd, on the CPU.

        Up to ``CPU_FUSED_MAX_BATCH`` rows: the fused forward (one wide matmul for the first layer,
        batched matmuls after it) into reused buffers, activations in place, no per-call bookkeeping
        once frozen (:meth:`freeze`). Larger batches: member after member, layer after layer (one
        member's weights and activations stay in the core's L2 cache, which the batched matmul's
        K-member working set does not), the last layer computed transposed into logits laid out
        (K, C, B), so the softmax reduces over a strided axis (on a contiguous class axis of 10,
        ``log_softmax`` costs ~0.2 µs per row). The same function as ``member_logits``' path up to
        float rounding; ``benchmarks/bench_serve.py`` measures both against the machine's limits.
        """
        K, B = len(self.members), x.shape[0]
        h = x.reshape(B, -1)
        if B <= CPU_FUSED_MAX_BATCH:
            slot = 0
            for w, b, layer in self._mlp_steps():
                if w is not None:
                    if slot == 0:
                        out = self._buffer(0, (B, w.shape[1]), h)
                        h = torch.mm(h, w, out=out) if b is None else torch.addmm(b, h, w, out=out)
                        h = h.view(B, K, -1).transpose(0, 1)
                    else:
                        out = self._buffer(slot, (K, B, w.shape[2]), h)
                        h = torch.bmm(h, w, out=out) if b is None else torch.baddbmm(b, h, w, out=out)
                    slot += 1
                elif layer is None:
                    h = h.relu_()
                else:
                    h = layer(h)
            lp = torch.log_softmax(h, dim=-1)
            # logsumexp over members as torch.logsumexp computes it, minus its guard for infinite maxima
            # (log-softmax values are finite for finite logits), in place: 8 fewer µs of ~200.
            m = lp.amax(dim=0)
            return lp.sub_(m).exp_().sum(dim=0).log_().add_(m)
        assert self._plan is not None
        stack = self._stacked()
        last = max(i for i, wb in enumerate(stack) if wb is not None)
        C = typing.cast(tuple, stack[last])[0].shape[1]
        logits = self._buffer(0, (K, C, B), h)  # (K, C, B): member k's logits transposed
        x2 = h
        for k in range(K):
            h, slot = x2, 1
            for i, (col, wb) in enumerate(zip(self._plan, stack)):
                layer = col[0]
                if wb is not None:
                    w, b = wb[0][k], None if wb[1] is None else wb[1][k]
                    if i == last:
                        torch.mm(w, h.t(), out=logits[k])
                        if b is not None:
                            logits[k].add_(b.unsqueeze(1))
                    else:
                        out = self._buffer(slot, (B, w.shape[0]), h)
                        h = torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)
                        slot += 1
                elif type(layer) is nn.ReLU and h is not x2:
                    h = h.relu_()
                elif not isinstance(layer, nn.Flatten):
                    h = layer(h)
        return torch.logsumexp(torch.log_softmax(logits, dim=1), dim=0).t().contiguous()
