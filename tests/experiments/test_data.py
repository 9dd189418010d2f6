"""Dataset loaders (generated files in the official layouts + guarded real-data smoke
tests) and batched augmentation."""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import tarfile
import types
import urllib.error
from pathlib import Path

import numpy as np
import PIL.Image as PIL_Image
import pytest
import torch

from reference_experiments import data, data_cifar, datafiles, rows
from reference_experiments.augment import augment, preprocess_eval
from reference_experiments.data import (
    CARS_DUPLICATE_PAIRS,
    DataIntegrityError,
    DatasetNotFoundError,
    ImageDataset,
    cars_split,
    load_dataset,
)
from reference_experiments.datasets import DATASETS

ROOT = Path(__file__).resolve().parents[2]

torch.set_num_threads(1)

SHARED = ROOT.parent / "shared" / "data"
REAL_CIFAR10 = SHARED / "cifar10-jpeg"
REAL_CARS = SHARED / "stanford-cars-train64"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CKD_CACHE_DIR", str(tmp_path / "cache"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_sums(folder: Path, names) -> None:
    lines = [f"{_sha256(folder / n)}  {n}" for n in names]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    PIL_Image.fromarray(arr).save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


# ------------------------------------------------------------------------ CIFAR-100
def _make_cifar100(root: Path, n_train: int = 20, n_test: int = 10) -> tuple[Path, dict]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 100, size=n).tolist()
        arrays[split] = (x, y)
        batch = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": y,
            b"coarse_labels": [v // 5 for v in y],
            b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072),  # R plane, G plane, B plane
        }
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {
        b"fine_label_names": [f"class{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, arrays


def test_cifar100_loader_on_generated_official_files(tmp_path, monkeypatch):
    folder, arrays = _make_cifar100(tmp_path)
    for name in ("train", "test", "meta"):
        monkeypatch.setitem(data.CIFAR100_MD5, name, _md5(folder / name))
    ds = load_dataset("cifar100", tmp_path)
    assert ds.name == "cifar100" and ds.num_classes == 100
    assert (ds.crop, ds.pad, ds.split_seed) == (32, 4, None)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (20, 32, 32, 3)
    assert ds.y_train.dtype == np.int64 and ds.x_test.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(ds.x_train, arrays["train"][0])  # channel order/layout
    np.testing.assert_array_equal(ds.y_test, arrays["test"][1])
    # the dataset folder itself is accepted as data_dir too
    assert load_dataset("cifar100", folder).x_test.shape == (10, 32, 32, 3)


class _Boom:
    """Unpickling this creates a marker file: proves whether pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_cifar100_md5_mismatch_raises_before_unpickling(tmp_path, monkeypatch):
    folder, _ = _make_cifar100(tmp_path)
    marker = tmp_path / "unpickled"
    (folder / "train").write_bytes(pickle.dumps({b"x": _Boom(str(marker))}, protocol=2))
    # generated files do not match the published md5s in data.CIFAR100_MD5
    with pytest.raises(DataIntegrityError, match="md5 mismatch"):
        load_dataset("cifar100", tmp_path)
    assert not marker.exists()
    # also when only the train file was swapped after its md5 was registered
    for name in ("test", "meta"):
        monkeypatch.setitem(data.CIFAR100_MD5, name, _md5(folder / name))
    with pytest.raises(DataIntegrityError):
        load_dataset("cifar100", tmp_path)
    assert not marker.exists()


def test_cifar100_sha256sums_checked(tmp_path, monkeypatch):
    folder, _ = _make_cifar100(tmp_path)
    for name in ("train", "test", "meta"):
        monkeypatch.setitem(data.CIFAR100_MD5, name, _md5(folder / name))
    (folder / "SHA256SUMS").write_text("0" * 64 + "  meta\n")
    with pytest.raises(DataIntegrityError, match="sha256 mismatch"):
        load_dataset("cifar100", tmp_path)


def test_cifar100_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # no download path
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)


def _tar_gz(folder: Path, archive: Path) -> Path:
    """The official archive layout: ``<folder name>/<file>`` members, gzip."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def test_cifar100_from_official_archive(tmp_path, monkeypatch):
    folder, arrays = _make_cifar100(tmp_path / "src")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = _tar_gz(folder, data_dir / "cifar-100-python.tar.gz")
    for name in ("train", "test", "meta"):
        monkeypatch.setitem(data.CIFAR100_MD5, name, _md5(folder / name))
    monkeypatch.setitem(data.CIFAR100_MD5, archive.name, _md5(archive))
    ds = load_dataset("cifar100", data_dir)
    np.testing.assert_array_equal(ds.x_train, arrays["train"][0])
    np.testing.assert_array_equal(ds.y_test, arrays["test"][1])
    assert not (data_dir / "cifar-100-python").exists()  # read in memory, not extracted


# ------------------------------------------------------------------------- CIFAR-10
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")  # fmt: skip
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck"]  # fmt: skip


def _make_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> tuple[Path, dict]:
    """Small arrays pickled in the official ``cifar-10-batches-py`` layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).tolist()
        batch = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": y,
            b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072),  # R plane, G plane, B plane
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        if name != "test_batch":
            xs.append(x)
            ys += y
        else:
            test = (x, y)
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [c.encode() for c in CIFAR10_LABELS],
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, {"train": (np.concatenate(xs), ys), "test": test}


def _register_cifar10(monkeypatch, folder: Path, archive: Path | None = None) -> None:
    for name in CIFAR10_FILES:
        monkeypatch.setitem(data.CIFAR10_MD5, name, _md5(folder / name))
    if archive is not None:
        monkeypatch.setitem(data.CIFAR10_MD5, archive.name, _md5(archive))


def test_cifar10_md5_table_is_the_official_one():
    assert "cifar10" in data.DATASET_NAMES
    assert data.CIFAR10_MD5 == {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    }
    assert data.CIFAR100_MD5["cifar-100-python.tar.gz"] == "eb9058c3a382ffc7106e4002c42a8d85"


def test_cifar10_loader_on_generated_official_folder(tmp_path, monkeypatch):
    folder, arrays = _make_cifar10(tmp_path)
    _register_cifar10(monkeypatch, folder)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert (ds.crop, ds.pad, ds.split_seed, ds.flip) == (32, 4, None, True)
    assert (ds.mean, ds.std) == (DATASETS["cifar10"].mean, DATASETS["cifar10"].std)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (20, 32, 32, 3)
    assert ds.y_train.dtype == np.int64 and ds.x_test.shape == (6, 32, 32, 3)
    # batches 1..5 in order, channel order/layout as in the official files
    np.testing.assert_array_equal(ds.x_train, arrays["train"][0])
    np.testing.assert_array_equal(ds.y_train, arrays["train"][1])
    np.testing.assert_array_equal(ds.x_test, arrays["test"][0])
    np.testing.assert_array_equal(ds.y_test, arrays["test"][1])
    # the dataset folder itself is accepted as data_dir too
    assert load_dataset("cifar10", folder).x_test.shape == (6, 32, 32, 3)


def test_cifar10_from_official_archive(tmp_path, monkeypatch):
    folder, arrays = _make_cifar10(tmp_path / "src")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = _tar_gz(folder, data_dir / "cifar-10-python.tar.gz")
    _register_cifar10(monkeypatch, folder, archive)
    ds = load_dataset("cifar10", data_dir)
    np.testing.assert_array_equal(ds.x_train, arrays["train"][0])
    np.testing.assert_array_equal(ds.y_test, arrays["test"][1])
    assert not (data_dir / "cifar-10-batches-py").exists()  # read in memory, not extracted
    # SHA256SUMS beside the archive is honoured too
    (data_dir / "SHA256SUMS").write_text("0" * 64 + "  cifar-10-python.tar.gz\n")
    with pytest.raises(DataIntegrityError, match="sha256 mismatch"):
        load_dataset("cifar10", data_dir)


def test_cifar10_md5_mismatch_raises_before_unpickling(tmp_path, monkeypatch):
    folder, _ = _make_cifar10(tmp_path)
    marker = tmp_path / "unpickled"
    # generated files do not match the published md5s in data.CIFAR10_MD5
    with pytest.raises(DataIntegrityError, match="md5 mismatch for .*data_batch_1"):
        load_dataset("cifar10", tmp_path)
    # a batch swapped after the table was registered: named, and never unpickled
    _register_cifar10(monkeypatch, folder)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"x": _Boom(str(marker))}, protocol=2))
    with pytest.raises(DataIntegrityError, match="md5 mismatch for .*data_batch_3"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar10_archive_md5_checked_before_reading(tmp_path, monkeypatch):
    folder, _ = _make_cifar10(tmp_path / "src")
    marker = tmp_path / "unpickled"
    _register_cifar10(monkeypatch, folder)  # member md5s of the genuine files
    (folder / "test_batch").write_bytes(pickle.dumps({b"x": _Boom(str(marker))}, protocol=2))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = _tar_gz(folder, data_dir / "cifar-10-python.tar.gz")
    # the archive itself is not the official one (published md5 still in the table)
    with pytest.raises(DataIntegrityError, match="md5 mismatch for .*cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir)
    assert not marker.exists()
    # archive md5 registered, but one member differs from its md5: named, not unpickled
    monkeypatch.setitem(data.CIFAR10_MD5, archive.name, _md5(archive))
    with pytest.raises(DataIntegrityError, match="tar.gz:cifar-10-batches-py/test_batch"):
        load_dataset("cifar10", data_dir)
    assert not marker.exists()
    # a registered archive lacking a member
    folder, _ = _make_cifar10(tmp_path / "src2")
    _register_cifar10(monkeypatch, folder)
    (folder / "data_batch_5").unlink()
    short = tmp_path / "short"
    short.mkdir()
    archive = _tar_gz(folder, short / "cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CIFAR10_MD5, archive.name, _md5(archive))
    with pytest.raises(DataIntegrityError, match="lacks cifar-10-batches-py/data_batch_5"):
        load_dataset("cifar10", short)


def _fake_torchvision(monkeypatch, cifar10) -> None:
    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    datasets.CIFAR10 = cifar10  # type: ignore[attr-defined]
    tv.datasets = datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_cifar10_torchvision_download_used_when_installed(tmp_path, monkeypatch):
    src, arrays = _make_cifar10(tmp_path / "src")
    _register_cifar10(monkeypatch, src)
    calls = []

    def fake_cifar10(root, train, download):  # what torchvision leaves under root
        calls.append((root, train, download))
        dest = Path(root) / "cifar-10-batches-py"
        dest.mkdir(parents=True)
        for name in CIFAR10_FILES:
            (dest / name).write_bytes((src / name).read_bytes())

    _fake_torchvision(monkeypatch, fake_cifar10)
    ds = load_dataset("cifar10", tmp_path / "data")
    assert calls == [(str(tmp_path / "data"), True, True)]
    np.testing.assert_array_equal(ds.x_train, arrays["train"][0])


# ----------------------------------------------------------- missing data: one line
def _one_line_error(name: str, data_dir=None) -> str:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, data_dir)
    assert isinstance(info.value, DatasetNotFoundError)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "name, folder, remedy",
    [
        ("cifar100", "cifar-100-python", ["torchvision.datasets.CIFAR100(", "download=True",
         "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]),
        ("cifar10", "cifar-10-batches-py", ["torchvision.datasets.CIFAR10(", "download=True",
         "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "--dataset cifar10-jpeg"]),
        ("cifar10-jpeg", "cifar10-jpeg", ["cifar10-jpeg.tar.xz", "classes.txt",
         "prepare-data --source cifar-10-python.tar.gz", "--dataset cifar10"]),
        ("cars64", "stanford-cars-train64", ["cars-train64-jpeg.tar.xz", "StanfordCars",
         "64x64"]),
    ],
)  # fmt: skip
def test_missing_dataset_message(tmp_path, monkeypatch, name, folder, remedy):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # no download path
    msg = _one_line_error(name, tmp_path)
    assert str(tmp_path / folder) in msg  # the folder searched
    assert f"data dir {tmp_path} from --data-dir" in msg
    assert "$CKD_DATA_DIR" in msg and str(ROOT.parent / "shared" / "data") in msg  # default
    for needle in remedy:
        assert needle in msg, needle
    if name.startswith("cifar1") and name != "cifar10-jpeg":
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        assert f"{tmp_path / archive} (no such file)" in msg
    # the same through $CKD_DATA_DIR names that origin
    monkeypatch.setenv("CKD_DATA_DIR", str(tmp_path))
    assert f"data dir {tmp_path} from $CKD_DATA_DIR" in _one_line_error(name)


def test_missing_message_lists_missing_files_of_partial_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    folder, _ = _make_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    (folder / "batches.meta").unlink()
    msg = _one_line_error("cifar10", tmp_path)
    assert f"searched {folder} (missing data_batch_4, batches.meta)" in msg


def test_missing_message_without_any_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("CKD_DATA_DIR", raising=False)
    monkeypatch.setattr(datafiles, "_repo_root", lambda: tmp_path / "repo")  # no ../shared/data
    assert data.default_data_dir() is None
    for name in ("cifar100", "cifar10", "cifar10-jpeg", "cars64"):
        msg = _one_line_error(name)
        assert "no data directory" in msg and "--data-dir" in msg and "$CKD_DATA_DIR" in msg
        assert str(tmp_path / "shared" / "data") in msg  # the default that does not exist


def test_cifar10_failed_download_still_one_line(tmp_path, monkeypatch):
    def offline(root, train, download):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    _fake_torchvision(monkeypatch, offline)
    msg = _one_line_error("cifar10", tmp_path)
    assert "torchvision download failed (URLError" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg


def test_digits_missing_scikit_learn_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    msg = _one_line_error("digits")
    assert "bundles" in msg and "scikit-learn" in msg and "pip install scikit-learn" in msg


# --------------------------------------------------------------------- CIFAR-10 JPEG
CLASSES = ["zebra", "apple", "mango"]  # deliberately not sorted: classes.txt order wins


def _make_cifar10_jpeg(root: Path) -> tuple[Path, dict]:
    folder = root / "cifar10-jpeg"
    folder.mkdir(parents=True)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    colours = {
        c: np.array([40 + 80 * i, 200 - 60 * i, 90], np.uint8) for i, c in enumerate(CLASSES)
    }
    counts = {"train": 4, "test": 2}
    with tarfile.open(folder / "cifar10-jpeg.tar.xz", "w:xz") as tar:
        for split in ("train", "test"):
            for cls in sorted(CLASSES):
                for i in range(counts[split]):
                    img = np.broadcast_to(colours[cls], (32, 32, 3)).copy()
                    _add(tar, f"{split}/{cls}/{i:04d}.jpg", _jpeg(img))
    _write_sums(folder, ["cifar10-jpeg.tar.xz", "classes.txt"])
    return folder, colours


def test_cifar10_jpeg_loader_and_cache(tmp_path, monkeypatch):
    folder, colours = _make_cifar10_jpeg(tmp_path / "data")
    ds = load_dataset("cifar10-jpeg", tmp_path / "data")
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert (ds.num_classes, ds.crop, ds.pad) == (3, 32, 4)
    for x, y in zip(ds.x_train, ds.y_train, strict=True):
        assert np.abs(x.astype(int) - colours[CLASSES[y]]).max() <= 3
    assert sorted(np.bincount(ds.y_test).tolist()) == [2, 2, 2]
    cached = list((tmp_path / "cache").glob("cifar10-jpeg-*.npz"))
    assert len(cached) == 1
    # written atomically (rows.atomic_write_bytes): no temporary file left beside it
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached[0].name]
    assert datafiles.atomic_write_bytes is rows.atomic_write_bytes
    # a truncated cache file is rebuilt, not trusted
    cached[0].write_bytes(cached[0].read_bytes()[:100])
    np.testing.assert_array_equal(load_dataset("cifar10-jpeg", tmp_path / "data").x_test, ds.x_test)
    # second load comes from the cache (decoding would fail now)
    monkeypatch.setattr(data_cifar, "decode_jpeg", lambda b: (_ for _ in ()).throw(AssertionError))
    ds2 = load_dataset("cifar10-jpeg", tmp_path / "data")
    np.testing.assert_array_equal(ds2.x_train, ds.x_train)


def test_cifar10_jpeg_checksum_mismatch(tmp_path):
    folder, _ = _make_cifar10_jpeg(tmp_path)
    (folder / "classes.txt").write_text("apple\nmango\nzebra\n")
    with pytest.raises(DataIntegrityError, match="classes.txt"):
        load_dataset("cifar10-jpeg", tmp_path)


@pytest.mark.skipif(
    not (REAL_CIFAR10 / "cifar10-jpeg.tar.xz").is_file(), reason="shared cifar10-jpeg not present"
)
def test_real_cifar10_jpeg_smoke():
    digests = datafiles._verify_sha256sums(REAL_CIFAR10, ["cifar10-jpeg.tar.xz", "classes.txt"])
    assert len(digests) == 2
    classes = (REAL_CIFAR10 / "classes.txt").read_text().split()
    assert classes[:3] == ["airplane", "automobile", "bird"]
    got = list(data.iter_cifar10_jpeg(REAL_CIFAR10 / "cifar10-jpeg.tar.xz", classes, limit=5))
    assert [(s, y) for s, y, _ in got] == [("train", 0)] * 5
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for _, _, img in got)


# ----------------------------------------------------------------------------- Cars
def _check_cars_split(y, idx, tr, te, pairs):
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    side = np.zeros(len(y), dtype=int)
    side[te] = 1
    pos = {int(v): i for i, v in enumerate(idx)}
    for a, b in pairs:
        assert side[pos[a]] == side[pos[b]], (a, b)
    for c in np.unique(y):
        n_c = int((y == c).sum())
        n_te = int((y[te] == c).sum())
        assert abs(n_te - round(0.2 * n_c)) <= 2, (c, n_c, n_te)


@pytest.mark.skipif(
    not (REAL_CARS / "cars-train64-jpeg.tar.xz").is_file(),
    reason="shared stanford-cars-train64 not present",
)
def test_real_cars_split_keeps_duplicate_pairs_on_one_side():
    _, y, idx = data.read_cars_archive(REAL_CARS / "cars-train64-jpeg.tar.xz", decode=False)
    assert len(y) == 8144 and len(np.unique(y)) == 196
    for a, b in CARS_DUPLICATE_PAIRS:  # the README's pairs carry conflicting labels
        assert y[a - 1] != y[b - 1]
    for seed in (0, 1):
        tr, te = cars_split(y, idx, seed=seed)
        _check_cars_split(y, idx, tr, te, CARS_DUPLICATE_PAIRS)
        assert 0.19 < len(te) / len(y) < 0.21
    tr0, _ = cars_split(y, idx, seed=0)
    tr1, _ = cars_split(y, idx, seed=1)
    assert not np.array_equal(tr0, tr1)
    np.testing.assert_array_equal(tr0, cars_split(y, idx, seed=0)[0])


def test_generated_cars_loader_detects_pixel_duplicates(tmp_path):
    folder = tmp_path / "stanford-cars-train64"
    folder.mkdir()
    rng = np.random.default_rng(1)
    n = 60
    y = np.repeat(np.arange(4), 15)
    rng.shuffle(y)
    imgs = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
    dup = [(3, 40), (10, 11), (20, 59)]  # 1-based idx, identical pixels, conflicting labels
    for a, b in dup:
        imgs[b - 1] = imgs[a - 1]
        y[b - 1] = (y[a - 1] + 1) % 4
    rows = ["file,idx,label"]
    with tarfile.open(folder / "cars-train64-jpeg.tar.xz", "w:xz") as tar:
        for i in range(n):
            _add(tar, f"images/{i + 1:05d}.jpg", _jpeg(imgs[i]))
            rows.append(f"images/{i + 1:05d}.jpg,{i + 1},{y[i]}")
        _add(tar, "labels.csv", ("\n".join(rows) + "\n").encode())
    (folder / "classes.txt").write_text("".join(f"car {c}\n" for c in range(4)))
    _write_sums(folder, ["cars-train64-jpeg.tar.xz", "classes.txt"])

    x, y_read, idx = data.read_cars_archive(folder / "cars-train64-jpeg.tar.xz")
    np.testing.assert_array_equal(y_read, y)
    for seed in range(5):
        ds = load_dataset("cars64", tmp_path, seed=seed)
        assert (ds.crop, ds.pad, ds.num_classes, ds.split_seed) == (56, 0, 4, seed)
        assert ds.x_train.shape[1:] == (64, 64, 3)
        assert len(ds.x_train) + len(ds.x_test) == n
        # no test image has an identical copy anywhere else
        train_hashes = {hashlib.sha256(im.tobytes()).digest() for im in ds.x_train}
        test_hashes = [hashlib.sha256(im.tobytes()).digest() for im in ds.x_test]
        assert not train_hashes & set(test_hashes)
        assert len(set(test_hashes)) == len(test_hashes)
        tr, te = cars_split(y, idx, x, seed=seed, pairs=[(1, 2)])  # listed pairs too
        _check_cars_split(y, idx, tr, te, dup + [(1, 2)])


# --------------------------------------------------------------------------- digits
def test_digits_split():
    ds = load_dataset("digits", seed=0)
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.uint8
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert (ds.crop, ds.pad, ds.num_classes, ds.split_seed) == (8, 1, 10, 0)
    assert ds.x_train.max() == 255
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again = load_dataset("digits", seed=0)
    np.testing.assert_array_equal(again.y_train, ds.y_train)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.x_train, ds.x_train)


def test_unknown_dataset_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="cifar10-jpeg"):
        load_dataset("cifar10-jpeg", tmp_path)


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CKD_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path


# ---------------------------------------------------------------------- augmentation
def _toy(name="toy", crop=32, pad=4, h=32, c=3, n=16, flip=True) -> ImageDataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, h, h, c), dtype=np.uint8)
    y = np.zeros(n, np.int64)
    return ImageDataset(
        name, x, y, x, y, 10, (0.5,) * c, (0.25,) * c, crop=crop, pad=pad, flip=flip
    )


def _reference_augment(x, ds, gen, flip_enabled=True):
    """Per-sample loop with F.pad; same random draws as augment()."""
    n, h, w, _ = x.shape
    crop, pad = ds.crop, ds.pad
    oy = torch.randint(0, h + 2 * pad - crop + 1, (n, 1), generator=gen)
    ox = torch.randint(0, w + 2 * pad - crop + 1, (n, 1), generator=gen)
    flip = (torch.rand((n, 1), generator=gen) < 0.5) if flip_enabled else torch.zeros(n, 1) > 0
    xp = torch.nn.functional.pad(x.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad))
    outs = []
    for i in range(n):
        im = xp[i, :, oy[i, 0] : oy[i, 0] + crop, ox[i, 0] : ox[i, 0] + crop]
        if flip[i, 0]:
            im = im.flip(-1)
        outs.append(im)
    out = torch.stack(outs) / 255.0
    mean = torch.tensor(ds.mean)[:, None, None]
    std = torch.tensor(ds.std)[:, None, None]
    return (out - mean) / std


@pytest.mark.parametrize("kind", ["cifar", "cars", "digits"])
def test_augment_matches_reference(kind):
    if kind == "cifar":
        ds = _toy()
    elif kind == "cars":
        ds = _toy("cars64", crop=56, pad=0, h=64)
    else:
        ds = _toy("digits", crop=8, pad=1, h=8, c=1, n=64, flip=False)
    x = torch.from_numpy(ds.x_train)
    out = augment(x, ds, torch.Generator().manual_seed(3))
    assert out.dtype == torch.float32 and out.shape == (len(x), ds.in_channels, ds.crop, ds.crop)
    ref = _reference_augment(x, ds, torch.Generator().manual_seed(3), kind != "digits")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # deterministic with a generator, varies without
    torch.testing.assert_close(out, augment(x, ds, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, augment(x, ds, torch.Generator().manual_seed(4)))


def test_augment_flips_and_pads():
    ds = _toy(n=256)
    x = torch.from_numpy(ds.x_train)
    out = augment(x, ds, torch.Generator().manual_seed(0))
    plain = preprocess_eval(x, ds)
    same = (out == plain).flatten(1).all(1)
    mirrored = (out == plain.flip(-1)).flatten(1).all(1)
    assert 0 < int(same.sum()) < 256 and 0 < int(mirrored.sum()) < 256  # flips both ways
    pad_value = (0 - 0.5) / 0.25
    assert (out == pad_value).any()  # zero (black) padding visible


def test_digits_never_flipped():
    ds = _toy("digits", crop=8, pad=0, h=8, c=1, n=64, flip=False)
    x = torch.from_numpy(ds.x_train)
    torch.testing.assert_close(
        augment(x, ds, torch.Generator().manual_seed(0)), preprocess_eval(x, ds)
    )


def test_preprocess_eval_centre_crop_and_normalize():
    ds = _toy("cars64", crop=56, pad=0, h=64, n=3)
    x = torch.from_numpy(ds.x_train)
    out = preprocess_eval(x, ds)
    assert out.shape == (3, 3, 56, 56)
    expect = (x[:, 4:60, 4:60].permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(out, expect)
    with pytest.raises(ValueError):
        preprocess_eval(x.float(), ds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_augment_cuda_matches_cpu_with_cpu_generator():
    ds = _toy()
    x = torch.from_numpy(ds.x_train)
    cpu = augment(x, ds, torch.Generator().manual_seed(0))
    gpu = augment(x.cuda(), ds, torch.Generator().manual_seed(0))
    assert gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gpu.cpu(), cpu)


# --------------------------------------------------------------------------- registry
def test_a_registered_data_set_is_loaded_augmented_and_explained_from_its_spec(monkeypatch):
    from reference_experiments import datasets
    from reference_experiments.datafiles import SplitArrays, _not_found

    def load_toy(where, seed):
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, size=(20, 6, 6, 1), dtype=np.uint8)
        return SplitArrays(x[:16], np.arange(16) % 4, x[16:], np.arange(4), 4, split_seed=seed)

    spec = datasets.DatasetSpec(
        "toy", "Toy squares", load_toy, "a test", "call load_toy", 6, 4, crop=6, pad=0, flip=False
    )
    monkeypatch.setitem(datasets.DATASETS, "toy", spec)
    ds = load_dataset("toy", seed=3)
    assert (ds.crop, ds.pad, ds.flip, ds.split_seed, ds.num_classes) == (6, 0, False, 3, 4)
    assert ds.mean == (float((ds.x_train / 255.0).mean()),)  # None in the spec: measured
    x = torch.from_numpy(ds.x_train)
    torch.testing.assert_close(augment(x, ds, torch.Generator()), preprocess_eval(x, ds))
    msg = str(_not_found("toy", "", datafiles.DataDir(None, "the default")))
    assert msg.startswith("Toy squares not found") and "call load_toy" in msg
    with pytest.raises(ValueError, match="unknown dataset 'nope'; choose from .*toy"):
        load_dataset("nope")


def test_data_module_exports_no_private_names():
    private = [n for n in vars(data) if n.startswith("_") and not n.startswith("__")]
    assert private == []
    assert set(data.DATASET_NAMES) == {
        "cifar100",
        "cifar10",
        "cifar10-jpeg",
        "cars64",
        "cars",
        "digits",
    }
