"""Student-loop throughput: an official-style loop vs the reference engine, one process.

Both train the same student (default ``wrn_16_2``) with the official CKD
method (``ckd_pn2``: 64 pairs per step, two forward passes) on the same
synthetic CIFAR-shaped subset (uint8 32x32 images, 10 classes, so no data
files are needed), and report student images per second:

* ``official``: the shape of ``alextxu/ckd``'s loop -- a ``DataLoader`` over a
  dataset that augments one image at a time, teacher logits cached one image at
  a time up front, ``.item()`` on the loss every step, one optimizer step per run;
* ``ours``: :func:`reference_experiments.engine.train` on one run and on a stack
  of ``--stack`` runs (seeds), as the engine runs them on this device, and with
  the other choice of each measured rule of :mod:`reference_experiments.devices`
  (vmapped stack or trials in turn; channels-last or not), so the JSON shows
  the measurement behind the rule.

``python benchmarks/student_loop.py --device cuda --out benchmarks/results/student_loop-gpu.json``
(CPU default: a small subset, for a smoke test). Ratios are side by side in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reference_experiments import devices, engine  # noqa: E402
from reference_experiments.augment import augment  # noqa: E402
from reference_experiments.config import RunConfig  # noqa: E402
from reference_experiments.data import ImageDataset  # noqa: E402
from reference_experiments.devices import autocast, resolve_device  # noqa: E402
from reference_experiments.models import create_model  # noqa: E402


def synthetic(n: int, seed: int = 0) -> ImageDataset:
    """CIFAR-shaped random images (the loop's speed does not depend on their content)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return ImageDataset(  # named cifar10: the run configs must name a known dataset
        "cifar10", x, y, x[:256], y[:256], 10, (0.5,) * 3, (0.25,) * 3, crop=32, pad=4
    )


class _PairDataset(torch.utils.data.Dataset):
    """Official-style: one (pos, neg) pair per item, each image augmented on its own."""

    def __init__(self, ds: ImageDataset, logits: torch.Tensor, pairs: np.ndarray) -> None:
        self.ds, self.logits, self.pairs = ds, logits, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        a, b = self.pairs[i]
        x = torch.from_numpy(self.ds.x_train[[a, b]])
        return augment(x, self.ds), torch.from_numpy(self.ds.y_train[[a, b]]), self.logits[[a, b]]


def official_loop(ds: ImageDataset, student: str, device: torch.device, steps: int) -> float:
    """Images per second of the official-style loop over ``steps`` steps."""
    torch.manual_seed(0)
    teacher = create_model("wrn_40_2", 10).to(device).eval()
    with torch.no_grad():  # teacher cached one image at a time (CachedSubset)
        logits = torch.stack(
            [
                teacher(augment(torch.from_numpy(ds.x_train[i : i + 1]), ds).to(device))[0].cpu()
                for i in range(len(ds.x_train))
            ]
        )
    model = create_model(student, 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    pairs = np.random.default_rng(0).integers(0, len(ds.x_train), size=(64 * (steps + 2), 2))
    loader = torch.utils.data.DataLoader(
        _PairDataset(ds, logits, pairs), batch_size=64, shuffle=True, num_workers=0
    )
    eye = torch.eye(10, device=device)
    done, t0 = 0, 0.0
    for k, (x, y, t) in enumerate(loader):
        if k == 2:  # warm-up steps excluded
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        x, y, t = x.to(device), y.to(device), t.to(device)
        with autocast(device):
            s_pos, s_neg = model(x[:, 0]).float(), model(x[:, 1]).float()
        ds_ = s_pos - s_neg
        loss = F.mse_loss(ds_, eye[y[:, 0]] - eye[y[:, 1]]) + F.mse_loss(ds_, t[:, 0] - t[:, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # the official loop's per-step host sync (AverageMeter)
        if k >= 2:
            done += x.shape[0] * 2
        if k + 1 >= steps + 2:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done / (time.perf_counter() - t0)


def ours(ds: ImageDataset, student: str, device: torch.device, stack: int, epochs: int):
    """(images/s per run, images/s of the stack) of the engine."""
    torch.manual_seed(0)
    teacher = create_model("wrn_40_2", 10).to(device).eval()
    cfgs = [
        RunConfig(
            dataset="cifar10",
            student_arch=student,
            method="ckd_pn2",
            budget=len(ds.x_train),
            seed=s,
            preset="fast",
            lr=0.05,
            max_epochs=epochs,
            device=str(device),
        )
        for s in range(stack)
    ]
    rows = engine.train(cfgs, dataset=ds, teacher=(teacher, {}))
    row = rows[0][1]
    return row.train_images_per_s, row.stack_images_per_s


@contextlib.contextmanager
def flipped(rule: str, device: torch.device):
    """The other choice of a :mod:`devices` rule (``VMAP_DEVICE_TYPES``,
    ``CHANNELS_LAST_DEVICE_TYPES``) on ``device``, for the duration of the block."""
    old = getattr(devices, rule)
    kinds = set(old) ^ {device.type}
    setattr(devices, rule, tuple(kinds))
    try:
        yield
    finally:
        setattr(devices, rule, old)


def measure_once(ds: ImageDataset, a: argparse.Namespace, device: torch.device) -> dict:
    """One measurement of every variant, images per second."""
    out = {"official_images_per_s": official_loop(ds, a.student, device, a.steps)}
    out["ours_single_images_per_s"], _ = ours(ds, a.student, device, 1, a.epochs)
    per_run, out["ours_stack_images_per_s"] = ours(ds, a.student, device, a.stack, a.epochs)
    out["ours_stack_per_run_images_per_s"] = per_run
    with flipped("VMAP_DEVICE_TYPES", device):
        _, out["ours_stack_other_runner_images_per_s"] = ours(
            ds, a.student, device, a.stack, a.epochs
        )
    with flipped("CHANNELS_LAST_DEVICE_TYPES", device):
        out["ours_single_other_layout_images_per_s"], _ = ours(ds, a.student, device, 1, a.epochs)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--student", default="wrn_16_2")
    p.add_argument("--n", type=int, default=320, help="subset size (images)")
    p.add_argument("--steps", type=int, default=6, help="official-loop steps timed")
    p.add_argument("--epochs", type=int, default=1, help="engine epochs")
    p.add_argument("--stack", type=int, default=4, help="runs per stacked step")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (best kept)")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    ds = synthetic(a.n)
    result = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "student": a.student,
        "method": "ckd_pn2 (64 pairs per step, two forward passes)",
        "subset": a.n,
    }
    best: dict[str, float] = {}
    for _ in range(a.repeats):  # interleaved, best of each: robust to a changing load
        for key, value in measure_once(ds, a, device).items():
            best[key] = max(best.get(key, 0.0), value)
    official = best.pop("official_images_per_s")
    result.update(
        official_images_per_s=official,
        **best,
        ours_single_channels_last=device.type in devices.CHANNELS_LAST_DEVICE_TYPES,
        ours_stack=a.stack,
        ours_stack_vmapped=devices.vmaps_stacks(device),
        repeats=a.repeats,
        load_average=os.getloadavg(),
    )
    for key in list(best):
        if not key.endswith("per_run_images_per_s"):
            ratio = key.removeprefix("ours_").removesuffix("_images_per_s")
            result[f"ratio_{ratio}_vs_official"] = best[key] / official
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
