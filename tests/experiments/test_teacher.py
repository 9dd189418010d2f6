"""Teacher training, safetensors save/load round trip, sha256 checks, CLI."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from reference_experiments import teacher
from reference_experiments.data import load_dataset
from reference_experiments.teacher_spec import (
    GRID_TEACHER_KEYS,
    TeacherSpec,
    add_teacher_arguments,
)

ROOT = Path(__file__).resolve().parents[2]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    spec = TeacherSpec("digits_cnn", "digits", epochs=1)
    path = teacher.train_teacher(spec, digits, out_dir=out, progress=False)
    return path


def test_train_teacher_writes_files_and_metadata(trained):
    assert trained.suffix == ".safetensors" and trained.is_file()
    meta = json.loads(trained.with_suffix(".json").read_text())
    for key in (
        "arch",
        "dataset",
        "num_classes",
        "split_seed",
        "epochs",
        "seed",
        "test_accuracy",
        "sha256",
        "in_channels",
    ):
        assert key in meta, key
    assert (meta["arch"], meta["dataset"], meta["num_classes"]) == ("digits_cnn", "digits", 10)
    assert (meta["split_seed"], meta["epochs"], meta["seed"], meta["in_channels"]) == (0, 1, 0, 1)
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    import hashlib

    assert meta["sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()
    # atomic writes (rows.atomic_write_bytes: ".<name>.*.tmp" then os.replace) leave
    # nothing behind
    assert sorted(p.name for p in trained.parent.iterdir()) == [
        trained.with_suffix(".json").name,
        trained.name,
    ]


def test_save_teacher_is_atomic(trained, tmp_path, monkeypatch):
    """A failed write leaves neither a partial file nor a temporary one."""
    from reference_experiments import rows

    model, meta = teacher.load_teacher(trained)
    path = teacher.save_teacher(model, tmp_path, "t", meta)
    assert path == tmp_path / "t.safetensors"
    assert teacher.load_teacher(path)[1]["sha256"] == meta["sha256"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rows.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        teacher.save_teacher(model, tmp_path, "t", {**meta, "seed": 99})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_load_round_trip_without_pickle(trained, digits, monkeypatch):
    def no_pickle(*a, **k):
        raise AssertionError("load_teacher must not unpickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    model, meta = teacher.load_teacher(trained)
    assert not model.training
    assert teacher.evaluate(model, digits, "cpu") == pytest.approx(meta["test_accuracy"])
    # the .json path and the stem work too, and give identical weights
    model2, _ = teacher.load_teacher(trained.with_suffix(".json"))
    model3, _ = teacher.load_teacher(trained.with_suffix(""))
    for (k, v), v2, v3 in zip(
        model.state_dict().items(),
        model2.state_dict().values(),
        model3.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(v, v2) and torch.equal(v, v3), k


def test_training_is_seeded(trained, digits, tmp_path):
    spec = TeacherSpec("digits_cnn", "digits", epochs=1, seed=0)
    again = teacher.train_teacher(spec, digits, out_dir=tmp_path, progress=False)
    assert again.name == trained.name
    assert again.read_bytes() == trained.read_bytes()


def test_tampered_weights_raise(trained, tmp_path):
    blob = bytearray(trained.read_bytes())
    blob[-5] ^= 0x01
    bad = tmp_path / trained.name
    bad.write_bytes(bytes(blob))
    (tmp_path / trained.with_suffix(".json").name).write_bytes(
        trained.with_suffix(".json").read_bytes()
    )
    with pytest.raises(ValueError, match="sha256 mismatch"):
        teacher.load_teacher(bad)


def test_tampered_metadata_raises(trained, tmp_path):
    meta = json.loads(trained.with_suffix(".json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / trained.name).write_bytes(trained.read_bytes())
    (tmp_path / trained.with_suffix(".json").name).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        teacher.load_teacher(tmp_path / trained.name)
    with pytest.raises(FileNotFoundError):
        teacher.load_teacher(tmp_path / "missing.safetensors")


def test_evaluate_restores_mode(digits):
    from reference_experiments.models import create_model

    m = create_model("digits_mlp", 10, in_channels=1).train()
    acc = teacher.evaluate(m, digits, "cpu", batch_size=100)
    assert 0.0 <= acc <= 1.0 and m.training


def test_cli_main(tmp_path, capsys):
    from reference_experiments.__main__ import main as cli_main

    assert (
        cli_main(
            [
                "train-teacher",
                "--arch",
                "digits_mlp",
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--seed",
                "3",
                "--out",
                str(tmp_path),
                "--device",
                "cpu",
                "--batch-size",
                "256",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "test_accuracy=" in out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "digits_mlp_digits_split0_ep1_seed3.json",
        "digits_mlp_digits_split0_ep1_seed3.safetensors",
    ]
    model, meta = teacher.load_teacher(tmp_path / files[1])
    assert meta["batch_size"] == 256 and meta["seed"] == 3


def test_missing_json_is_rebuilt_from_the_weights_file(trained, tmp_path):
    """A kill between the two writes (weights written, JSON not) loses nothing."""
    import shutil

    weights = tmp_path / trained.name
    shutil.copy(trained, weights)
    original = json.loads(trained.with_suffix(".json").read_text())
    model, meta = teacher.load_teacher(weights)
    assert weights.with_suffix(".json").is_file()
    timings = ("train_seconds", "train_images_per_s")  # kept out of the weights' bytes
    assert {k: v for k, v in meta.items() if k not in timings} == {
        k: v for k, v in original.items() if k not in timings
    }
    assert teacher.load_teacher(weights)[1]["sha256"] == original["sha256"]


def test_foreign_safetensors_without_json_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a teacher saved by this package"):
        teacher.load_teacher(tmp_path / "other.safetensors")


# --------------------------------------------------------------------------- the spec
def test_teacher_spec_derives_cli_grid_keys_and_metadata(monkeypatch):
    import argparse

    from reference_experiments import config

    p = argparse.ArgumentParser()
    add_teacher_arguments(p)
    ns = p.parse_args("--arch digits_cnn --dataset digits --epochs 3 --lr 0.1 --out o".split())
    spec = TeacherSpec.from_arguments(ns)
    assert spec == TeacherSpec("digits_cnn", "digits", epochs=3, lr=0.1)
    assert spec == TeacherSpec.from_grid(
        {"arch": "digits_cnn", "train_epochs": 3, "lr": 0.1}, "digits"
    )
    assert set(GRID_TEACHER_KEYS) >= {"arch", "train_epochs", "seed", "lr", "warmup_epochs"}
    with pytest.raises(ValueError, match="unknown keys \\['epochs'\\]"):
        TeacherSpec.from_grid({"arch": "digits_cnn", "epochs": 3}, "digits")
    # the optimiser comes from the preset
    slow = config.Preset("slow", "plateau", max_epochs=1, momentum=0.5, weight_decay=1e-3)
    monkeypatch.setitem(config.PRESETS, "slow", slow)
    meta = TeacherSpec("digits_cnn", "digits", epochs=1, preset="slow").metadata(64)
    assert (meta["momentum"], meta["weight_decay"], meta["batch_size"]) == (0.5, 1e-3, 64)


def test_teacher_options_import_without_torch():
    import subprocess

    code = (
        "import sys, argparse; from reference_experiments import teacher_spec; "
        "teacher_spec.add_teacher_arguments(argparse.ArgumentParser()); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


# --------------------------------------------------------------------------- recipes
def test_repdistiller_recipe_fills_what_is_not_given():
    import argparse

    p = argparse.ArgumentParser()
    add_teacher_arguments(p)
    ns = p.parse_args("--arch vgg13 --dataset cifar100 --recipe repdistiller --out o".split())
    spec = TeacherSpec.from_arguments(ns)
    assert (spec.epochs, spec.batch_size, spec.lr, spec.precision) == (240, 64, 0.05, "fp32")
    assert (spec.warmup_epochs, spec.label_smoothing) == (0.0, 0.0)
    assert (spec.momentum, spec.weight_decay) == (0.9, 5e-4)
    ns = p.parse_args(
        "--arch vgg13 --dataset cifar100 --recipe repdistiller --lr 0.1 --out o".split()
    )
    assert TeacherSpec.from_arguments(ns).lr == 0.1  # an explicit option wins
    grid = TeacherSpec.from_grid({"arch": "vgg13", "recipe": "repdistiller"}, "cifar100")
    assert grid == spec
    meta = spec.metadata(64)
    assert (meta["recipe"], meta["precision"]) == ("repdistiller", "fp32")
    assert meta["schedule"] == "step x0.1 at epochs 150/180/210"
    fast = TeacherSpec("vgg13", "cifar100", epochs=30)
    assert (fast.recipe, fast.precision, fast.batch_size) == ("fast", "fp32", 128)
    assert fast.metadata(128)["schedule"] == "cosine-per-step"
    with pytest.raises(ValueError, match="epochs required"):
        TeacherSpec("vgg13", "cifar100")
    with pytest.raises(ValueError, match="unknown recipe"):
        TeacherSpec("vgg13", "cifar100", recipe="mine")
    with pytest.raises(ValueError, match="unknown precision"):
        TeacherSpec("vgg13", "cifar100", epochs=1, precision="fp8").validate()


def test_repdistiller_lr_steps_as_adjust_learning_rate():
    """RepDistiller: lr 0.05 * 0.1 ** (number of milestones the 1-based epoch is past)."""
    spec = TeacherSpec("vgg13", "cifar100", recipe="repdistiller")
    steps = 781  # 50,000 // 64

    def official(epoch: int) -> float:  # 1-based, as train_teacher.py counts
        return 0.05 * 0.1 ** sum(epoch > m for m in (150, 180, 210))

    for epoch in (1, 150, 151, 180, 181, 210, 211, 240):
        for s in (0, steps - 1):
            got = spec.lr * spec.lr_factor((epoch - 1) * steps + s, steps)
            assert got == pytest.approx(official(epoch), rel=1e-12), (epoch, s)
    short = TeacherSpec("vgg13", "cifar100", recipe="repdistiller", epochs=24)
    assert short.lr_milestones == (15, 18, 21)


def test_teacher_seconds_predicts_steps_times_step_time():
    from reference_experiments.teacher_spec import teacher_seconds

    spec = TeacherSpec("wrn_40_2", "cifar100", recipe="repdistiller")
    assert teacher_seconds(spec, 50_000, 0.01) == pytest.approx(781 * 240 * 0.01)
    assert teacher_seconds(spec, 50_000, 0.01, epochs_done=200) == pytest.approx(781 * 40 * 0.01)
    tiny = TeacherSpec("digits_cnn", "digits", epochs=2, batch_size=500)
    assert teacher_seconds(tiny, 100, 1.0) == 2.0  # the batch is at most the data


def test_precision_names_are_the_devices():
    from reference_experiments.devices import PRECISIONS
    from reference_experiments.teacher_spec import PRECISION_NAMES

    assert PRECISION_NAMES == tuple(PRECISIONS)


def test_trained_teacher_records_recipe_and_precision(trained):
    """The recipe and the precision computed in (float32, as the official code trains)."""
    meta = json.loads(trained.with_suffix(".json").read_text())
    assert (meta["recipe"], meta["precision"], meta["saved_dtype"]) == ("fast", "fp32", "float32")


def test_training_steps_through_the_engines_sgd_step(digits, tmp_path, monkeypatch):
    from reference_experiments import config, stack

    slow = config.Preset("slow", "plateau", max_epochs=1, momentum=0.5, weight_decay=1e-3)
    monkeypatch.setitem(config.PRESETS, "slow", slow)
    presets = []

    def recording_sgd_step(params, grads, momentum, lr, preset):
        presets.append(preset)
        stack.sgd_step(params, grads, momentum, lr, preset)

    monkeypatch.setattr(teacher, "sgd_step", recording_sgd_step)
    spec = TeacherSpec("digits_mlp", "digits", epochs=1, batch_size=256, preset="slow")
    teacher.train_teacher(spec, digits, out_dir=tmp_path, progress=False)
    assert presets == [slow] * spec.steps_per_epoch(len(digits.y_train))


def test_cli_recipe_reaches_the_metadata(tmp_path):
    from reference_experiments.__main__ import main as cli_main

    argv = "train-teacher --arch digits_mlp --dataset digits --recipe repdistiller --epochs 1"
    assert (
        cli_main([*argv.split(), "--out", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    )
    _, meta = teacher.load_teacher(tmp_path / "digits_mlp_digits_split0_ep1_seed0_repdistiller")
    assert (meta["recipe"], meta["batch_size"], meta["precision"]) == ("repdistiller", 64, "fp32")


def test_train_teacher_saves_float16_shards(trained, digits, tmp_path):
    spec = TeacherSpec("digits_cnn", "digits", epochs=1)
    path = teacher.train_teacher(
        spec,
        digits,
        out_dir=tmp_path,
        progress=False,
        save_dtype=torch.float16,
        max_shard_bytes=160_000,
    )
    assert path == tmp_path / "digits_cnn_digits_split0_ep1_seed0.json"
    assert len(json.loads(path.read_text())["shards"]) >= 2
    model, meta = teacher.load_teacher(path)
    reference, _ = teacher.load_teacher(trained)  # the same training, saved in float32
    for (k, got), want in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        rounded = want.half().to(want.dtype) if want.is_floating_point() else want
        assert got.dtype == want.dtype and torch.equal(got, rounded), k
