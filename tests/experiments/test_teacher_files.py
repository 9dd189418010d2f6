"""Teacher files: float16 weights, < 16 MiB shards of a real vgg13, every sha256 checked,
no pickle, and where a resume checkpoint is not a teacher."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from reference_experiments import teacher_files
from reference_experiments.models import create_model

torch.set_num_threads(1)

MIB = 2**20


def _vgg13() -> torch.nn.Module:
    """A vgg13 with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = create_model("vgg13", 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def vgg13():
    return _vgg13()


@pytest.fixture(scope="module")
def sharded(vgg13, tmp_path_factory):
    out = tmp_path_factory.mktemp("vgg13")
    meta = {"arch": "vgg13", "num_classes": 100, "in_channels": 3, "dataset": "cifar100"}
    path = teacher_files.save_teacher(
        vgg13, out, "vgg13_t", meta, dtype=torch.float16, max_shard_bytes=16 * MIB
    )
    return path


def test_vgg13_goes_into_float16_shards_under_16_mib(vgg13, sharded):
    fp32_bytes = sum(v.numel() * v.element_size() for v in vgg13.state_dict().values())
    assert fp32_bytes > 32 * MIB  # fp16 alone would not fit one 16 MiB file
    meta = json.loads(sharded.read_text())
    shards = meta["shards"]
    assert len(shards) >= 2 and meta["saved_dtype"] == "float16"
    names = [s["file"] for s in shards]
    assert names == [f"vgg13_t.{k}-of-{len(shards)}.safetensors" for k in range(1, len(names) + 1)]
    blobs = [(sharded.parent / n).read_bytes() for n in names]
    assert all(len(b) < 16 * MIB for b in blobs)
    import hashlib

    assert [s["sha256"] for s in shards] == [hashlib.sha256(b).hexdigest() for b in blobs]
    assert meta["sha256"] == hashlib.sha256(b"".join(blobs)).hexdigest()
    assert sorted(p.name for p in sharded.parent.iterdir()) == sorted([*names, sharded.name])


def test_sharded_float16_teacher_loads_as_float32_with_rounded_weights(vgg13, sharded, monkeypatch):
    def no_pickle(*a, **k):
        raise AssertionError("load_teacher must not unpickle")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    model, meta = teacher_files.load_teacher(sharded)
    assert all(
        p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point()
    )
    rounded = _vgg13()
    with torch.no_grad():
        for v in rounded.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.half().float())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), rounded(x))
        assert not torch.equal(model(x), vgg13(x))  # the float16 rounding is visible
    # any of its files names the teacher
    first_shard = sharded.parent / meta["shards"][0]["file"]
    assert teacher_files.load_teacher(first_shard)[1] == meta
    assert teacher_files.load_teacher(sharded.with_suffix(""))[1] == meta


def test_a_tampered_or_missing_shard_is_refused(sharded, tmp_path):
    meta = json.loads(sharded.read_text())
    for p in sharded.parent.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    second = tmp_path / meta["shards"][1]["file"]
    blob = bytearray(second.read_bytes())
    blob[-3] ^= 0x01
    second.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256 mismatch for shard"):
        teacher_files.load_teacher(tmp_path / sharded.name)
    second.unlink()
    with pytest.raises(FileNotFoundError):
        teacher_files.load_teacher(tmp_path / sharded.name)


def test_small_float32_teacher_stays_one_file(tmp_path):
    model = create_model("digits_mlp", 10, in_channels=1)
    meta = {"arch": "digits_mlp", "num_classes": 10, "in_channels": 1}
    path = teacher_files.save_teacher(model, tmp_path, "m", meta, max_shard_bytes=16 * MIB)
    assert path == tmp_path / "m.safetensors"
    saved = json.loads((tmp_path / "m.json").read_text())
    assert "shards" not in saved and saved["saved_dtype"] == "float32"
    assert teacher_files.find_teacher(tmp_path) == tmp_path / "m.json"
    loaded, _ = teacher_files.load_teacher(path)
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_a_tensor_larger_than_a_shard_is_refused(tmp_path):
    model = create_model("digits_mlp", 10, in_channels=1)
    with pytest.raises(ValueError, match="does not fit"):
        teacher_files.save_teacher(model, tmp_path, "m", {}, max_shard_bytes=1024)
    assert list(tmp_path.iterdir()) == []


def test_resume_checkpoint_is_not_a_teacher(tmp_path):
    teacher_files.save_resume(tmp_path, "t", {"w": torch.zeros(2)}, {"epochs_done": 1})
    assert teacher_files.find_teacher(tmp_path) is None
    with pytest.raises(ValueError, match="resume checkpoint"):
        teacher_files.load_teacher(tmp_path / "t.resume.safetensors")
    tensors, state = teacher_files.load_resume(tmp_path, "t")
    assert state == {"epochs_done": 1} and torch.equal(tensors["w"], torch.zeros(2))
    teacher_files.remove_resume(tmp_path, "t")
    assert list(tmp_path.iterdir()) == [] and teacher_files.load_resume(tmp_path, "t") is None
