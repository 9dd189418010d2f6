"""import-teacher: RepDistiller-format checkpoints give the same logits and features as
RepDistiller's own model code (``repdistiller_models.py``), bad checkpoints fail loudly."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from repdistiller_models import MODEL_DICT

from reference_experiments import __main__ as cli
from reference_experiments import cli_options
from reference_experiments.augment import preprocess_eval
from reference_experiments.data import ImageDataset
from reference_experiments.datasets import dataset_names, dataset_spec
from reference_experiments.import_teacher import import_teacher, read_checkpoint
from reference_experiments.models import MODEL_NAMES
from reference_experiments.teacher import load_teacher

torch.set_num_threads(1)


def _repdistiller_teacher(arch: str, num_classes: int = 100, seed: int = 0) -> torch.nn.Module:
    """RepDistiller's model with random BatchNorm affines and running statistics from
    a few train-mode passes, in eval mode."""
    torch.manual_seed(seed)
    model = MODEL_DICT[arch](num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 2.0 + 0.5)
    return model.eval()


def _checkpoint(model: torch.nn.Module, path: Path, **extra) -> Path:
    """A file as RepDistiller's train_teacher.py writes it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.save(
        {"epoch": 240, "model": model.state_dict(), "optimizer": opt.state_dict(), **extra}, path
    )
    return path


#: every arch of this package that RepDistiller has (the paper's teachers among them)
ARCHS = [arch for arch in MODEL_DICT if arch in MODEL_NAMES]


def test_paper_teachers_covered():
    assert {"wrn_40_2", "resnet110", "vgg13"} <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_imported_teacher_matches_repdistiller_model(arch, tmp_path):
    reference = _repdistiller_teacher(arch)
    assert any(
        float(m.running_mean.abs().max()) > 0.01
        for m in reference.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )
    source = _checkpoint(reference, tmp_path / "ckpt_epoch_240.pth", accuracy=75.0)
    path = import_teacher(arch, source, tmp_path / "out", dataset="cifar100")
    model, meta = load_teacher(path)
    assert meta["recipe"] == "repdistiller"
    assert (meta["epochs"], meta["batch_size"], meta["precision"]) == (240, 64, "fp32")
    assert meta["schedule"] == "step x0.1 at epochs 150/180/210" and meta["seed"] is None
    assert meta["source_file"] == "ckpt_epoch_240.pth"
    assert meta["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["test_accuracy"] is None and meta["num_classes"] == 100
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want_feats, want = reference.double()(x, is_feat=True)
        got, got_feats = model.double()(x, return_features=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(got_feats) == len(want_feats)
    for g, w in zip(got_feats, want_feats, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_bare_legacy_format_and_last_checkpoint_with_options(tmp_path):
    """A bare state dict; the pre-1.6 file format (RepDistiller's released teachers date
    from 2019); a ``*_last.pth`` holding the run's ``argparse.Namespace``."""
    reference = _repdistiller_teacher("wrn_16_2")
    want = reference.state_dict()
    bare = tmp_path / "bare.pth"
    torch.save(want, bare)
    legacy = tmp_path / "legacy.pth"
    torch.save({"epoch": 240, "model": want}, legacy, _use_new_zipfile_serialization=False)
    last = _checkpoint(reference, tmp_path / "wrn_16_2_last.pth", opt=argparse.Namespace(lr=0.05))
    for source in (bare, legacy, last):
        state, digest = read_checkpoint(source)
        assert len(state) == len(want)
        assert digest == hashlib.sha256(source.read_bytes()).hexdigest()
        path = import_teacher("wrn_16_2", source, tmp_path / source.stem)
        model, _ = load_teacher(path)
        torch.testing.assert_close(
            model.state_dict()["block1.0.bn1.running_var"],
            want["block1.layer.0.bn1.running_var"],
        )


class _Payload:
    """Unpickling it would create a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_arbitrary_pickle_refused_unexecuted(tmp_path):
    reference = _repdistiller_teacher("resnet32")
    marker = tmp_path / "executed"
    source = _checkpoint(reference, tmp_path / "evil.pth", hook=_Payload(str(marker)))
    with pytest.raises(ValueError, match="refused to unpickle"):
        import_teacher("resnet32", source, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_wrong_arch_lists_missing_and_unexpected_keys(tmp_path):
    source = _checkpoint(_repdistiller_teacher("resnet32"), tmp_path / "r32.pth")
    with pytest.raises(ValueError, match=r"missing: .*layer1\.5\.bn2\.weight") as err:
        import_teacher("resnet110", source, tmp_path / "out")
    assert "unexpected" not in str(err.value)
    with pytest.raises(ValueError, match=r"missing: .*unexpected: .*layer1\.0\.conv1\.weight"):
        import_teacher("wrn_16_2", source, tmp_path / "out")


def test_wrong_class_count_and_extra_tensor(tmp_path):
    ten = _repdistiller_teacher("resnet32", num_classes=10)
    source = _checkpoint(ten, tmp_path / "cifar10.pth")
    with pytest.raises(ValueError, match=r"shape mismatch .*fc\.weight \(10, 64\) vs \(100, 64\)"):
        import_teacher("resnet32", source, tmp_path / "out", dataset="cifar100")
    import_teacher("resnet32", source, tmp_path / "out10", dataset="cifar10")
    state = {**ten.state_dict(), "proj.weight": torch.zeros(3)}
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected: proj\.weight$"):
        import_teacher("resnet32", tmp_path / "extra.pth", tmp_path / "out", dataset="cifar10")


def _tiny_cifar100(n: int = 16) -> ImageDataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, n).astype(np.int64)
    spec = dataset_spec("cifar100")
    assert spec.mean is not None and spec.std is not None
    return ImageDataset("cifar100", x, y, x, y, 100, spec.mean, spec.std, crop=32, pad=4)


def test_test_accuracy_measured_when_the_checkpoint_fits(tmp_path):
    reference = _repdistiller_teacher("vgg8")
    data = _tiny_cifar100()
    # labels the reference gets right on half the images: accuracy exactly 0.5
    x = preprocess_eval(torch.from_numpy(data.x_test), data)
    with torch.no_grad():
        predicted = reference.float()(x).argmax(1).numpy()
    y = np.where(np.arange(len(predicted)) % 2 == 0, predicted, (predicted + 1) % 100)
    data = ImageDataset(
        "cifar100", data.x_train, y, data.x_test, y, 100, data.mean, data.std, 32, 4
    )
    source = _checkpoint(reference, tmp_path / "vgg8.pth")
    _, meta = load_teacher(import_teacher("vgg8", source, tmp_path / "out", data=lambda: data))
    assert meta["test_accuracy"] == 0.5
    asked = []
    with pytest.raises(ValueError, match="missing"):  # no data loaded for a misfit
        import_teacher("vgg13", source, tmp_path / "misfit", data=lambda: asked.append(1))
    assert not asked
    other = dataclasses.replace(data, name="cifar10")
    with pytest.raises(ValueError, match="data set 'cifar10' given to measure a 'cifar100'"):
        import_teacher("vgg8", source, tmp_path / "other", data=lambda: other)


def test_cli_import_teacher(tmp_path, capsys):
    assert set(cli_options.IMPORT_DATASETS) <= set(dataset_names())
    source = _checkpoint(_repdistiller_teacher("resnet32"), tmp_path / "r32.pth")
    out = tmp_path / "teachers"
    argv = ["import-teacher", "--arch", "resnet32", "--checkpoint", str(source), "--out", str(out)]
    rc = cli.main([*argv, "--dataset", "cifar100", "--data-dir", str(tmp_path / "no-data")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    [weights] = out.glob("*.safetensors")
    assert str(weights) in captured.out and "not measured" in captured.out
    _, meta = load_teacher(weights)
    assert meta["arch"] == "resnet32" and meta["test_accuracy"] is None
    rc = cli.main([*argv, "--arch", "resnet110", "--data-dir", str(tmp_path / "no-data")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: checkpoint does not fit the model: missing:")
    rc = cli.main([*argv, "--dataset", "cars64"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: unknown dataset 'cars64'; choose from cifar100,")
