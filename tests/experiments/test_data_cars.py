"""The official Stanford Cars setting (``cars``): both halves, full images resized to
64x64, read from torchvision's folder layout; tested on small generated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image as PIL_Image
import pytest

from reference_experiments.data import DatasetNotFoundError, load_dataset


def _one_line_error(name: str, data_dir) -> str:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _write_cars_half(base: Path, ann: str, folder: str, images, labels) -> list[str]:
    """One official half: JPEG-free PNG files of any size and an ``annotations`` .mat."""
    from scipy.io import savemat

    (base / folder).mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:05d}.png" for i in range(len(images))]
    for name, img in zip(names, images, strict=True):
        PIL_Image.fromarray(img).save(base / folder / name)
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("class", "O"), ("fname", "O")]
    rec = np.array([(1, 1, int(c) + 1, n) for c, n in zip(labels, names, strict=True)], fields)
    (base / ann).parent.mkdir(parents=True, exist_ok=True)
    savemat(base / ann, {"annotations": rec[None, :]})
    return names


def test_official_cars_loader_on_generated_files(tmp_path, monkeypatch):
    """Full images (varied sizes, one greyscale) resized to 64x64 as the official
    Resize((64, 64)), the official halves kept, 1-based classes made 0-based."""
    monkeypatch.setenv("CKD_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    base = tmp_path / "stanford_cars"
    sizes = [(40, 90), (120, 70), (64, 64), (33, 200), (80, 81)]
    train = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    train[2] = np.repeat(train[2][..., :1], 3, axis=2)  # stored below as greyscale
    test = [rng.integers(0, 256, (50 + 7 * i, 60, 3), dtype=np.uint8) for i in range(3)]
    y_train, y_test = np.array([0, 2, 1, 2, 0]), np.array([1, 0, 2])
    _write_cars_half(base, "devkit/cars_train_annos.mat", "cars_train", train, y_train)
    _write_cars_half(base, "cars_test_annos_withlabels.mat", "cars_test", test, y_test)
    PIL_Image.fromarray(train[2][..., 0]).save(base / "cars_train" / "00003.png")  # mode L

    for seed in (0, 1):  # the official split: the seed changes nothing
        ds = load_dataset("cars", tmp_path, seed=seed)
        assert (ds.crop, ds.pad, ds.flip, ds.num_classes, ds.split_seed) == (56, 0, True, 3, None)
        np.testing.assert_array_equal(ds.y_train, y_train)
        np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.x_train.shape == (5, 64, 64, 3) and ds.x_test.shape == (3, 64, 64, 3)
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    for got, img in [*zip(ds.x_train, train, strict=True), *zip(ds.x_test, test, strict=True)]:
        want = PIL_Image.fromarray(img).resize((64, 64), PIL_Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(got, np.asarray(want))
    assert list((tmp_path / "cache").glob("cars-official-*.npz"))  # decoded once, cached

    (base / "cars_test" / "00002.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing 1 of the 3 images .*00002.png"):
        load_dataset("cars", tmp_path)
    msg = _one_line_error("cars", tmp_path / "empty")
    assert "stanford_cars" in msg and "cars_train_annos.mat" in msg and "--dataset cars64" in msg
