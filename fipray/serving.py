"""The ensemble server's engine: shard maths, the shards' engines and what their members take.

Nothing here imports Ray or Serve (``fipray.ray.serve`` wraps it in deployments), so all of it is
unit-testable in-process. Shards hold engines by ensemble version (:class:`EngineCache`), so a live
switch never mixes two ensembles in one answer. Request parsing (JSON inputs, JSON texts, ``.npy``
bodies, validated against an ``InputSpec``) and the ``/metadata`` answer are
:mod:`fipray.serving_requests`; the validated app arguments (``ServeArgs``) are :mod:`fipray.serving_args`.

Sharding is exact. A shard holding members ``k ∈ M_s`` returns, in log space for stability, its
softmax sum ``L_s = log Σ_{k∈M_s} softmax(f_k(x))`` ``(B, C)``. The ensemble's head is then
``log p = logsumexp_s L_s − log K``, the same number the in-process :class:`~fipray.ensemble.Ensemble`
computes (logsumexp is associative). For a loss ℓ(log p) with upstream ``g = ∂ℓ/∂ log p`` ``(B, C)``,

    ∇ₓ ℓ = Σ_s ∇ₓ ⟨u_s, L_s(x)⟩,   u_s = g ⊙ exp(L_s − logsumexp_{s'} L_{s'})

(each class's gradient shared out by the shard's share of that class's probability mass), so each
shard returns its own vector-Jacobian product and the ingress adds them: the exact input gradient of
log(mean softmax) without any shard seeing another's members.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fipray.ensemble_folder import load_ensemble, local_ensemble, read_ensemble_meta


def split_members(num_members: int, shards: int) -> list[list[int]]:
    """Contiguous, near-equal blocks of member indices, one per shard.

    Raises:
        ValueError: ``shards`` < 1 or more shards than members.
    """
    if not 1 <= shards <= num_members:
        raise ValueError(f"shards must be in [1, {num_members}] for {num_members} members, got {shards}")
    return [blk.tolist() for blk in np.array_split(np.arange(num_members), shards)]


class ShardEngine:
    """Some members of a saved ensemble, evaluated together (fused when the architecture allows).

    Args:
        directory: Ensemble folder (``ensemble.json`` + ``members.safetensors``; safetensors only), or its URI
            (read from this node's cache: :func:`~fipray.ensemble_folder.local_ensemble`).
        member_ids: Which members this shard holds; None = all.
        device: Where the members live (``"cuda"`` on a GPU shard).
        threads: torch intra-op threads in this process (1 for small models on shared CPUs); 0 keeps
            torch's default.
    """

    def __init__(
        self,
        directory: str | Path,
        member_ids: Sequence[int] | None = None,
        *,
        device: str = "cpu",
        threads: int = 1,
    ):
        if threads > 0:
            torch.set_num_threads(threads)
        directory = local_ensemble(directory)
        self.meta = read_ensemble_meta(directory)
        n = self.meta["num_members"]
        self.member_ids = list(range(n)) if member_ids is None else [int(k) for k in member_ids]
        self.device = torch.device(device)
        self.ensemble = load_ensemble(directory, members=self.member_ids, device=self.device)
        # Only input gradients are ever asked for, and the weights never change while loaded.
        self.ensemble.freeze()

    def input_facts(self) -> dict[str, Any]:
        """What the members take: ``{"tokens", "vocab_size", "type_vocab_size"}`` (see :func:`model_input_facts`)."""
        return model_input_facts(self.ensemble.members[0])

    def log_prob_sum(self, x: Tensor) -> Tensor:
        """``L_s = log Σ_{k in shard} softmax(f_k(x))``: ``(B, *input_shape)`` -> ``(B, C)`` on the CPU."""
        with torch.no_grad():
            return self._log_prob_sum(self._cast(x)).cpu()

    def log_prob_sum_vjp(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """``L_s(x)`` and ``∇ₓ ⟨u, L_s(x)⟩`` (``(B, C)`` and ``(B, *input_shape)``, on the CPU)."""
        with torch.enable_grad():
            xg = x.detach().to(self.device, torch.float32).requires_grad_(True)
            out = self._log_prob_sum(xg)
            (grad,) = torch.autograd.grad(out, xg, grad_outputs=u.to(self.device, out.dtype))
        return out.detach().cpu(), grad.cpu()

    def _cast(self, x: Tensor) -> Tensor:
        # Token ids stay integers; everything else is float32 on the members' device.
        return x.to(self.device) if not x.is_floating_point() else x.to(self.device, torch.float32)

    def _log_prob_sum(self, x: Tensor) -> Tensor:
        return self.ensemble.log_prob_sum(x)


def combine_log_parts(parts: Tensor, num_members: int) -> Tensor:
    """log(mean softmax) ``(B, C)`` from the shards' log softmax sums ``parts`` ``(S, B, C)``."""
    return torch.logsumexp(parts, dim=0) - math.log(num_members)


def shard_upstreams(parts: Tensor, g: Tensor) -> Tensor:
    """Per-shard upstream vectors ``u_s = g ⊙ exp(L_s − logsumexp_s L_s)`` ``(S, B, C)`` (module docstring)."""
    return g.unsqueeze(0) * torch.softmax(parts, dim=0)


def model_input_facts(model: torch.nn.Module) -> dict[str, Any]:
    """``{"tokens", "vocab_size", "type_vocab_size"}`` of one member (what its inputs must be)."""
    from fipray.models.hf import HFTextClassifier

    if isinstance(model, HFTextClassifier):
        cfg: Any = model.model.config
        return {"tokens": True, "vocab_size": int(cfg.vocab_size), "type_vocab_size": int(cfg.type_vocab_size)}
    return {"tokens": False, "vocab_size": 0, "type_vocab_size": 0}


class EngineCache:
    """The shard engines one process holds, by ensemble version (folder, checksum, member ids).

    Requests name the version they were admitted under, so a shard never mixes two ensembles in one
    answer: during a switch the old and the new engine live side by side (at most ``keep``), and a
    replica that Serve restarted loads whatever version it is asked for.
    """

    def __init__(self, keep: int = 2, *, device: str = "cpu", threads: int = 1):
        self.keep, self.device, self.threads = keep, device, threads
        self._engines: dict[tuple, ShardEngine] = {}

    def get(self, directory: str, sha256: str, member_ids: Sequence[int]) -> ShardEngine:
        """The engine of that version, loading it (and dropping the oldest beyond ``keep``) if needed.

        Raises:
            ValueError: the folder's checksum is no longer ``sha256`` (it was rewritten in place).
        """
        key = (str(directory), str(sha256), tuple(int(k) for k in member_ids))
        engine = self._engines.pop(key, None)
        if engine is None:
            engine = ShardEngine(directory, key[2], device=self.device, threads=self.threads)
            if engine.meta["members_sha256"] != sha256:
                raise ValueError(f"ensemble {directory} changed on disk: checksum {engine.meta['members_sha256']}, "
                                 f"expected {sha256}")
        self._engines[key] = engine  # most recently used last
        while len(self._engines) > self.keep:
            self._engines.pop(next(iter(self._engines)))
        return engine

    def versions(self) -> list[tuple]:
        return list(self._engines)
