"""Test helpers shared by the test folders (serving, ensembles, Ray commands): seeded random ensembles
on disk, free ports, the processes whose command line names something (Ray replicas, a Ray folder).

Importable as ``_ensembles`` from every test folder (pytest puts ``tests/``, the folder of the root
conftest, on ``sys.path``).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fipray.ensemble_folder import save_ensemble
from fipray.models import create_model


def processes_mentioning(text: str) -> list:
    """The live processes (``psutil.Process``) whose command line contains ``text``."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if text in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:  # gone meanwhile, or not ours to read
            pass
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_ensemble(directory: str | Path, name: str, kwargs: Mapping[str, Any], input_shape: tuple[int, ...], *,
                    num_classes: int, members: int, seed: int = 0, metadata: Mapping[str, Any] | None = None,
                    tokenizer: str | None = None) -> Path:
    """Save ``members`` networks ``create_model(name, ...)`` seeded ``seed``, ``seed + 1``, ... to ``directory``."""
    ms = []
    for i in range(members):
        torch.manual_seed(seed + i)
        ms.append(create_model(name, num_classes=num_classes, input_shape=input_shape, **kwargs))
    spec = {"name": name, "kwargs": dict(kwargs), "num_classes": num_classes, "input_shape": list(input_shape)}
    return save_ensemble(ms, directory, model_spec=spec, metadata=dict(metadata or {"operation": "test"}),
                         tokenizer=tokenizer)
