"""The tokenizer every text source shares: a Hugging Face tokenizer from a local folder or shortcut name.

    load_tokenizer("minilm-l6")                       # the AutoTokenizer, offline and cached
    tokenize(texts, pairs, "minilm-l6", 128)          # int64 ids (N, L), or (N, 2, L) for sentence pairs

Shortcut names are resolved by :mod:`fipray.models.pretrained`. ``padding="max_length"`` and truncation;
without pairs each row is ``[CLS] text [SEP]`` then pad ids; with pairs row 0 holds the ids of
``[CLS] a [SEP] b [SEP]`` and row 1 the ``token_type_ids`` (0 for ``a``, 1 for ``b``, 0 on padding).
The table-backed sources are in :mod:`fipray.data.text`, the BBC News corpus in :mod:`fipray.data.bbc`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fipray.models.pretrained import resolve_pretrained

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")


@functools.lru_cache(maxsize=4)
def _auto_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_tokenizer(tokenizer: str | Path) -> Any:
    """The ``AutoTokenizer`` of a local folder or shortcut name, loaded offline (and cached).

    Raises:
        FileNotFoundError: Not a folder or known name, its package is missing, or the folder holds
            no tokenizer files.
    """
    folder = resolve_pretrained(tokenizer)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {folder} (expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    return _auto_tokenizer(str(folder.resolve()))


def tokenize(
    texts: Sequence[str], pairs: Sequence[str] | None, tokenizer: str | Path, max_length: int
) -> torch.Tensor:
    """Token ids ``(N, max_length)``, or ``(N, 2, max_length)`` (ids, token_type_ids) with ``pairs``.

    Args:
        texts: The (first) texts.
        pairs: Second texts of sentence pairs, one per text, or None.
        tokenizer: Folder or shortcut name (see :func:`load_tokenizer`).
        max_length: Padded/truncated length, special tokens included.

    Returns:
        int64 ids padded with the tokenizer's pad id (pairs truncated longest-first).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pairs)} pair texts")
    tok = load_tokenizer(tokenizer)
    enc = tok(
        list(texts),
        list(pairs) if pairs is not None else None,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_token_type_ids=pairs is not None,
        return_attention_mask=False,
        return_tensors="np",
    )
    ids = torch.from_numpy(np.asarray(enc["input_ids"], dtype=np.int64))
    if pairs is None:
        return ids
    types = torch.from_numpy(np.asarray(enc["token_type_ids"], dtype=np.int64))
    return torch.stack([ids, types], dim=1)
