"""A user's data checked against the model before any training (the Python API: `run_experiment(cfg, bundle=...)`).

    check_inputs(bundle, spec, model)

One item and one forward pass of two examples, so a wrong `input_shape`, too few `num_classes`, token ids given to
an image model (or images to a text model) fail at once with a message naming the DataBundle field or the config
key to fix, instead of a raw torch error deep in training ("mat1 and mat2 shapes cannot be multiplied",
"Target 2 is out of bounds", "mat1 and mat2 must have the same dtype").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class InputError(ValueError):
    """The data does not fit the model or its own description; the message names the field to fix."""


def _labels(ds: Any) -> torch.Tensor | None:
    from fipray.data.core import _fast_labels

    return _fast_labels(ds)


def check_inputs(bundle: Any, spec: dict, model: nn.Module) -> None:
    """Raise InputError unless `bundle`'s items match its `input_shape`, its labels lie in `[0, num_classes)` and
    `model` (built from `spec`) reads a batch of two training items into `num_classes` outputs."""
    from fipray.models.registry import _TOKEN_INPUT_MODELS

    name = spec.get("name", "?")
    for field in ("train", "test"):
        ds = getattr(bundle, field)
        if len(ds) == 0:
            raise InputError(f"DataBundle.{field} is empty")
        x, y = ds[0]
        x = torch.as_tensor(x)
        if tuple(x.shape) != tuple(bundle.input_shape):
            raise InputError(f"DataBundle.input_shape is {tuple(bundle.input_shape)} but the {field} items have shape "
                             f"{tuple(x.shape)}: fix input_shape (or the dataset's items)")
        labels = _labels(ds)
        labels = torch.as_tensor([int(y)]) if labels is None else labels
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= bundle.num_classes):
            raise InputError(f"DataBundle.num_classes is {bundle.num_classes} but the {field} labels run from "
                             f"{int(labels.min())} to {int(labels.max())}: labels must lie in [0, num_classes)")
    tokens = not x.is_floating_point()
    if tokens and name not in _TOKEN_INPUT_MODELS:
        raise InputError(f"the data's inputs are integer token ids ({x.dtype}) but model {name!r} reads float "
                         f"inputs: use a text model (e.g. {', '.join(sorted(_TOKEN_INPUT_MODELS)[:3])}) in config "
                         f"section 'model'")
    if not tokens and name in _TOKEN_INPUT_MODELS:
        raise InputError(f"model {name!r} reads integer token ids but the data's inputs are {x.dtype}: use an "
                         f"image/vector model in config section 'model', or tokenised text data")
    batch = torch.stack([torch.as_tensor(bundle.train[i][0]) for i in range(min(2, len(bundle.train)))])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model(batch.to(device))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise InputError(f"model {name!r} cannot read DataBundle.train's items (shape {tuple(x.shape)}, {x.dtype}): "
                         f"{str(e).splitlines()[0]}") from None
    finally:
        model.train(was)
    if out.ndim != 2 or out.shape[1] < bundle.num_classes:
        raise InputError(f"model {name!r} gives outputs of shape {tuple(out.shape)} for {bundle.num_classes} "
                         f"classes (DataBundle.num_classes)")
