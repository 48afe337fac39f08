"""A FIP path whose network is sharded over several ranks (torch FSDP2), for networks larger than a device.

    model = shard_model(model)   # in every rank of a process group (a Ray Train worker group)

`ray.parallel: fsdp` with `ray.backend: train` and `ray.workers_per_path: N`: each of the N ranks of the
path's TorchTrainer holds 1/N of every parameter (and of the optimizer's state); a forward or backward
pass gathers one layer's full weights at a time and frees them after (`fully_shard` per layer, then
the root). Unlike `ray.parallel: ddp`, the ranks do not split the data: every rank follows the path's
own batches, memory draws and kicks (seed + k), and the gradients FSDP averages over ranks are that one
path's gradients, so the sharded path is the unsharded path to floating-point tolerance. The penalty
step is unchanged: it only calls the network and `backward()`.

The core loop (`fipray.path.run_path`) sees `ShardedModel`, a module whose `state_dict()` is the full
network (gathered on every rank, a collective every rank makes at the same step because every rank
runs the same loop) and whose `load_state_dict` takes a full network and keeps this rank's shard. So
checkpoints, samples and the final network are the same files an unsharded path writes. The
optimizer's state stays sharded: each rank checkpoints its own (`paths.py` keeps one checkpoint per rank).
Nothing here imports Ray; `torch.distributed` must be initialised (Ray Train does it, gloo on CPUs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ShardedModel(nn.Module):
    """An FSDP2-sharded network that reads and writes full state dicts (see the module docstring)."""

    def __init__(self, sharded: nn.Module):
        super().__init__()
        self.sharded = sharded

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.sharded(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The full network on every rank (an all-gather of every parameter and buffer)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.sharded, options=StateDictOptions(full_state_dict=True))
        return {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a full network (the same on every rank); each rank keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        return set_model_state_dict(self.sharded, dict(state_dict),
                                    options=StateDictOptions(full_state_dict=True, strict=strict))


def shard_model(model: nn.Module, mesh: Any = None) -> ShardedModel:
    """Shard `model` over the default process group: every module that owns parameters, then the root.

    Args:
        model: the full network, the same on every rank (built from the same seed and w0).
        mesh: a 1-D device mesh; None: all ranks of the default group, on the model's device type.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        dev = next(model.parameters()).device.type
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
    for m in list(model.modules())[1:]:
        if any(True for _ in m.parameters(recurse=False)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return ShardedModel(model)


def full_flat(model: nn.Module) -> torch.Tensor:
    """All trainable weights as one flat full vector (gathers sharded parameters); shape (n_params,)."""
    from torch.distributed.tensor import DTensor

    parts = []
    for p in model.parameters():
        if p.requires_grad:
            t = p.detach()
            parts.append((t.full_tensor() if isinstance(t, DTensor) else t).reshape(-1))
    return torch.cat(parts)


class FullState(nn.Module):
    """The full network of a finished sharded path, for writing it out: `state_dict()` returns it."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.full = {k: v.detach().cpu() for k, v in state.items()}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self.full)


def gather(model: nn.Module) -> nn.Module:
    """Collective (every rank calls it): a sharded model's full network as a `FullState`; others unchanged."""
    return FullState(model.state_dict()) if isinstance(model, ShardedModel) else model
