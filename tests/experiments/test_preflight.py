"""The GPU window's preflight on the CPU: data checksums, the precision fallbacks (the
stacked bf16 path reached by letting the CPU autocast as CUDA does), the step timings."""

from __future__ import annotations

import hashlib

import pytest
import torch

from reference_experiments import devices, preflight, stack
from reference_experiments.config import RunConfig

torch.set_num_threads(1)


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    monkeypatch.setattr(devices, "VMAP_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(devices, "AUTOCAST_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(devices, "BATCHNORM_FP32", devices.BATCHNORM_FP32)  # restored after


def stacks(*names: str) -> list[list[RunConfig]]:
    return [
        [
            RunConfig(dataset="digits", student_arch="digits_cnn", teacher_arch="digits_cnn",
                      method=m, budget=100, preset="fast", device="cpu", seed=s)
            for s in (0, 1)
        ]
        for m in names
    ]  # fmt: skip


def test_data_checksums_are_compared(tmp_path):
    folder = tmp_path / "cifar10-jpeg"
    folder.mkdir()
    (folder / "cifar10-jpeg.tar.xz").write_bytes(b"images")
    good = hashlib.sha256(b"images").hexdigest()
    (folder / "SHA256SUMS").write_text(f"{good}  cifar10-jpeg.tar.xz\n")
    (ok,) = preflight.check_data(["cifar10-jpeg"], str(tmp_path))
    assert ok.status == "ok"
    (folder / "cifar10-jpeg.tar.xz").write_bytes(b"imageZ")
    (bad,) = preflight.check_data(["cifar10-jpeg"], str(tmp_path))
    assert bad.status == "FAIL" and "cifar10-jpeg.tar.xz" in bad.detail
    (missing,) = preflight.check_data(["cifar10-jpeg"], str(tmp_path / "none"))
    assert missing.status == "FAIL"


def test_bf16_stacks_fall_back_to_float32_batchnorm(digits, teacher, cpu_as_cuda):
    lines: list[str] = []
    got = preflight.check_methods(
        stacks("kd", "ce"), digits, lambda c: teacher, "bf16", lines.append
    )
    assert "preflight: bf16 as asked: 2 stacks failed, falling back" in lines
    assert lines[-1] == "preflight: precision: bf16, BatchNorm in float32"
    assert got.precision == "bf16" and devices.BATCHNORM_FP32 and not got.failed
    assert sorted(got.timings) == [
        "digits/digits_cnn->digits_cnn/ce/bf16/bs64/x2",
        "digits/digits_cnn->digits_cnn/kd/bf16/bs64/x2",
    ]
    assert all(t.step_s > 0 and t.eval_s_per_image > 0 for t in got.timings.values())


def test_then_no_autocast(digits, teacher, cpu_as_cuda, monkeypatch):
    real = stack.Learner._student

    def bf16_breaks(self, x, with_features):
        if self.precision != "fp32":
            raise RuntimeError("a bf16 kernel is missing")
        return real(self, x, with_features)

    monkeypatch.setattr(stack.Learner, "_student", bf16_breaks)
    lines: list[str] = []
    got = preflight.check_methods(stacks("kd"), digits, lambda c: teacher, "bf16", lines.append)
    assert lines[-1] == "preflight: precision: no autocast (fp32)"
    assert got.precision == "fp32" and list(got.timings) == [
        "digits/digits_cnn->digits_cnn/kd/fp32/bs64/x2"
    ]


def test_cuda_check_on_the_cpu():
    assert preflight.check_cuda("cuda", dry_run=True).status == "skipped"
    assert preflight.check_cuda("cpu", dry_run=False).status == "skipped"
    if not torch.cuda.is_available():
        assert preflight.check_cuda("auto", dry_run=False).status == "skipped"
        assert preflight.check_cuda("cuda", dry_run=False).status == "FAIL"
