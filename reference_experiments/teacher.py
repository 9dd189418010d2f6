"""Teacher training, evaluation and safe (non-pickle) save/load.

``train_teacher`` trains a :class:`TeacherSpec` with SGD (the preset's momentum and
weight decay, per-step cosine schedule), batched on-device augmentation, and bf16
autocast + channels-last on CUDA, then writes ``<out_dir>/<name>.safetensors`` and
``<name>.json`` atomically. The JSON records arch, dataset, num_classes,
in_channels, split_seed, epochs, seed, test_accuracy (fraction in [0, 1]) and the
sha256 of the safetensors file. ``load_teacher`` verifies that sha256 before
loading with safetensors; nothing is ever unpickled.

CLI (``python -m reference_experiments train-teacher``; its options are declared in
``cli_options.add_train_teacher_arguments``, derived from :class:`TeacherSpec`)::

    python -m reference_experiments train-teacher --arch wrn_40_2 --dataset cifar10-jpeg \\
        --epochs 240 --seed 0 --out teachers/

Under ``torchrun --nproc_per_node=N`` (see ``reference_experiments/distributed.py``)
the model is wrapped in ``DistributedDataParallel``: every rank draws the same
permutation and takes rows ``rank::N`` of each global batch of ``batch_size``
(the hyperparameters keep their single-process meaning); rank 0 evaluates and
saves, and every rank returns the same path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .augment import augment, preprocess_eval
from .data import ImageDataset
from .devices import autocast as _autocast
from .devices import resolve_device as _resolve_device
from .models import create_model
from .rows import atomic_write_bytes
from .teacher_spec import TeacherSpec

__all__ = ["evaluate", "load_teacher", "teacher_name", "train_teacher"]

FORMAT_VERSION = 1


def teacher_name(arch: str, dataset: ImageDataset, epochs: int, seed: int) -> str:
    """File stem used by ``train_teacher``."""
    split = f"_split{dataset.split_seed}" if dataset.split_seed is not None else ""
    return f"{arch}_{dataset.name}{split}_ep{epochs}_seed{seed}"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
) -> float:
    """Top-1 test accuracy (fraction in [0, 1]) on ``dataset.x_test`` (centre crop).

    The model is used where it is (not moved); its train/eval flag is restored.
    """
    dev = _resolve_device(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    n = len(dataset.y_test)
    try:
        for i in range(0, n, batch_size):
            xb = torch.from_numpy(dataset.x_test[i : i + batch_size]).to(dev, non_blocking=True)
            yb = torch.from_numpy(dataset.y_test[i : i + batch_size]).to(dev, non_blocking=True)
            with _autocast(dev):
                logits = model(preprocess_eval(xb, dataset))
            correct += (logits.argmax(1) == yb).sum()
    finally:
        model.train(was_training)
    return float(correct.item()) / max(n, 1)


def save_teacher(model: nn.Module, out_dir: str | Path, name: str, meta: dict[str, Any]) -> Path:
    """Write ``name.safetensors`` then ``name.json`` (with its sha256), both atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # The metadata inside the weights file too (one key, sorted: safetensors does not
    # keep key order), so a kill between the two writes loses nothing but the timings,
    # which stay out to keep the bytes (and the sha256) reproducible.
    volatile = ("train_seconds", "train_images_per_s", "file", "sha256")
    kept = {k: v for k, v in meta.items() if k not in volatile}
    blob = save(tensors, metadata={"ckd_teacher": json.dumps(kept, sort_keys=True)})
    out = Path(out_dir)
    weights = out / f"{name}.safetensors"
    atomic_write_bytes(weights, blob)
    meta = {**meta, "file": weights.name, "sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_bytes(out / f"{name}.json", (json.dumps(meta, indent=2) + "\n").encode())
    return weights


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (no tensor is read)."""
    if len(blob) < 8:
        raise ValueError("file too short for a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("truncated safetensors header")
    return dict(json.loads(blob[8 : 8 + size]).get("__metadata__") or {})


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def load_teacher(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a saved teacher (``.safetensors``, ``.json`` or the common stem).

    Checks the safetensors file's sha256 against the JSON metadata first (raises
    ``ValueError`` on mismatch), then loads the bytes already hashed with
    safetensors (no pickle). A missing JSON (a kill between the two writes) is
    rebuilt from the metadata inside the weights file. Returns ``(model in eval
    mode on device, metadata)``.
    """
    from safetensors.torch import load

    weights, meta_path = _paths(path)
    if not weights.is_file():
        raise FileNotFoundError(f"teacher file {path} not found")
    blob = weights.read_bytes()
    got = hashlib.sha256(blob).hexdigest()
    if not meta_path.is_file():
        try:
            header = _header_metadata(blob)
            meta = {**json.loads(header["ckd_teacher"]), "file": weights.name, "sha256": got}
        except (KeyError, ValueError) as e:
            raise ValueError(f"{weights} is not a teacher saved by this package: {e}") from None
        atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    meta = json.loads(meta_path.read_text())
    if got != meta.get("sha256"):
        raise ValueError(
            f"sha256 mismatch for {weights}: metadata says {meta.get('sha256')}, file has "
            f"{got}; the weights were modified or belong to another run"
        )
    state = load(blob)
    dev = _resolve_device(device)
    model = create_model(meta["arch"], int(meta["num_classes"]), int(meta.get("in_channels", 3)))
    model.load_state_dict(state, strict=True)
    model.to(dev)
    if dev.type == "cuda":
        # torch's stubs lack Module.to(memory_format=...), which exists at runtime
        cast(Any, model).to(memory_format=torch.channels_last)
    model.eval()
    return model, meta


@dataclass
class _TeacherRun:
    """One teacher's training state: the model (and its DDP wrapper), data on the
    device, generators, optimiser and lr schedule."""

    model: nn.Module
    net: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    batch_size: int
    steps_per_epoch: int
    gen: torch.Generator
    perm_gen: torch.Generator
    opt: torch.optim.SGD
    sched: torch.optim.lr_scheduler.LambdaLR
    loss_scale: float


def _cosine_after_warmup(step: int, warm: int, total: int) -> float:
    """lr factor at ``step``: linear over ``warm`` steps, then a cosine to 0 at ``total``."""
    if step < warm:
        return (step + 1) / warm
    done = min(step - warm, total - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * done))


def _start(spec: TeacherSpec, dataset: ImageDataset, dev: torch.device) -> _TeacherRun:
    """Model (seeded init), data, generators, DDP wrapper (under torchrun) and SGD."""
    from . import distributed as rdist

    world, rank = rdist.world_size(), rdist.rank()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = create_model(spec.arch, dataset.num_classes, dataset.in_channels)
    model.to(dev)
    if dev.type == "cuda":
        # torch's stubs lack Module.to(memory_format=...), which exists at runtime
        cast(Any, model).to(memory_format=torch.channels_last)
    n = len(dataset.y_train)
    bs = max(1, min(spec.batch_size, n))
    steps_per_epoch = n // bs
    gen = torch.Generator(device=dev).manual_seed(spec.seed)
    perm_gen, net = gen, model
    if world > 1:  # same permutation everywhere, per-rank augmentation
        perm_gen = torch.Generator(device=dev).manual_seed(spec.seed)
        gen.manual_seed(spec.seed + 1_000_003 * rank)
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if bs < world:
        raise ValueError(f"batch_size {bs} < world size {world}")
    warm = int(spec.warmup_epochs * steps_per_epoch)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=spec.lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        nesterov=warm > 0,
    )
    total = max(1, spec.epochs * steps_per_epoch)
    factor = functools.partial(_cosine_after_warmup, warm=warm, total=total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return _TeacherRun(
        model,
        net,
        torch.from_numpy(dataset.x_train).to(dev),
        torch.from_numpy(dataset.y_train).to(dev),
        bs,
        steps_per_epoch,
        gen,
        perm_gen,
        opt,
        sched,
        # DDP averages per-rank gradients: weigh a shard of n_r of bs rows by n_r * world / bs
        loss_scale=rdist.shard_size(bs) * world / bs,
    )


def _epoch(run: _TeacherRun, spec: TeacherSpec, dataset: ImageDataset) -> tuple[float, float]:
    """One epoch over a fresh seeded permutation (the incomplete last batch dropped);
    ``(mean loss, training accuracy)`` over all ranks' rows."""
    from . import distributed as rdist

    dev, bs = run.x_train.device, run.batch_size
    perm = torch.randperm(len(run.y_train), device=dev, generator=run.perm_gen)
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    for s in range(run.steps_per_epoch):
        idx = rdist.shard(perm[s * bs : (s + 1) * bs])
        xb = augment(run.x_train[idx], dataset, run.gen)
        yb = run.y_train[idx]
        with _autocast(dev):
            logits = run.net(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=spec.label_smoothing)
        run.opt.zero_grad(set_to_none=True)
        (loss * run.loss_scale if run.loss_scale != 1.0 else loss).backward()
        run.opt.step()
        run.sched.step()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == yb).sum()
    world = rdist.world_size()
    if world > 1:  # all ranks' rows (one all-reduce per epoch)
        loss_sum = rdist.sum_over_ranks(loss_sum * run.loss_scale) / world
        correct = rdist.sum_over_ranks(correct)
    steps = max(1, run.steps_per_epoch)
    return loss_sum.item() / steps, correct.item() / (steps * bs)


def train_teacher(
    spec: TeacherSpec,
    dataset: ImageDataset,
    *,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Trains the teacher ``spec`` describes on ``dataset``, saves it, returns the
    ``.safetensors`` path.

    One epoch = ``len(x_train) // batch_size`` steps over a fresh seeded permutation;
    lr rises linearly over ``warmup_epochs`` then follows a per-step cosine from ``lr``
    to 0; cross-entropy with ``label_smoothing``. Data stay as uint8 on ``device``;
    augmentation is batched there.
    """
    from . import distributed as rdist

    spec.validate()
    rdist.init_from_env()
    dev = rdist.device_for(_resolve_device(device))  # cuda -> cuda:LOCAL_RANK under torchrun
    run = _start(spec, dataset, dev)
    bar = None
    if progress and rdist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.epochs, desc=f"teacher {spec.arch}/{dataset.name}", unit="epoch")
    t0 = time.perf_counter()
    run.model.train()
    for _ in range(spec.epochs):
        loss, train_acc = _epoch(run, spec, dataset)
        if bar is not None:
            lr = run.sched.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss:.3f}", train_acc=f"{train_acc:.3f}", lr=f"{lr:.4f}")
            bar.update(1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    name = teacher_name(spec.arch, dataset, spec.epochs, spec.seed)
    if not rdist.is_main():  # rank 0 evaluates and saves
        rdist.barrier()
        return Path(out_dir) / f"{name}.safetensors"
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        **spec.metadata(run.batch_size),
        "dataset": dataset.name,
        "num_classes": int(dataset.num_classes),
        "in_channels": int(dataset.in_channels),
        "split_seed": dataset.split_seed,
        "test_accuracy": evaluate(run.model, dataset, dev),
        "train_seconds": round(seconds, 3),
        "train_images_per_s": round(
            spec.epochs * run.steps_per_epoch * run.batch_size / max(seconds, 1e-9), 1
        ),
        "device": str(dev),
        "torch": torch.__version__,
    }
    if rdist.world_size() > 1:
        meta["world_size"] = rdist.world_size()
    path = save_teacher(run.model, out_dir, name, meta)
    rdist.barrier()
    return path
