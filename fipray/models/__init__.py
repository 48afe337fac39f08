"""Model zoo: ``create_model(name, num_classes=..., input_shape=..., **kwargs)`` over a name registry.

Every model maps a float batch ``(B, *input_shape)`` with values in ``[0, 1]`` (or int64 token ids
``(B, L)``, or ``(B, 2, L)`` sentence pairs, for text models) to logits ``(B, num_classes)``.
Normalisation is part of the model (``mean``/``std`` kwargs). Importing this package registers the
built-in families. ``resolve_pretrained`` maps shortcut names (``"minilm-l6"``) to packaged weights.
"""

from fipray.models import hf as _hf  # noqa: F401  (registers hf_bert, hf_vit)
from fipray.models import mnist as _mnist  # noqa: F401  (registers mnist_fast_cnn, lenet5_mnist)
from fipray.models import simple as _simple  # noqa: F401  (registers mlp, lenet_300_100, small_cnn, small_bn_cnn)
from fipray.models import timm_models as _timm_models  # noqa: F401  (registers the timm: prefix)
from fipray.models.hf import HFImageClassifier, HFTextClassifier
from fipray.models.pretrained import PRETRAINED, PretrainedSource, resolve_pretrained
from fipray.models.registry import (
    MODELS,
    Normalize,
    create_model,
    list_models,
    load_state_dict_file,
    model_from_spec,
    register_model,
    register_model_prefix,
)

__all__ = [
    "MODELS",
    "HFImageClassifier",
    "HFTextClassifier",
    "Normalize",
    "PRETRAINED",
    "PretrainedSource",
    "create_model",
    "list_models",
    "load_state_dict_file",
    "model_from_spec",
    "register_model",
    "register_model_prefix",
    "resolve_pretrained",
]
