"""Teacher training, evaluation and safe (non-pickle) save/load.

``train_teacher`` trains with SGD (momentum 0.9, weight decay 5e-4, per-step cosine
schedule), batched on-device augmentation, and bf16 autocast + channels-last on CUDA,
then writes ``<out_dir>/<name>.safetensors`` and ``<name>.json`` atomically. The JSON
records arch, dataset, num_classes, in_channels, split_seed, epochs, seed,
test_accuracy (fraction in [0, 1]) and the sha256 of the safetensors file.
``load_teacher`` verifies that sha256 before loading with safetensors; nothing is
ever unpickled.

CLI (dispatched by ``python -m reference_experiments train-teacher``)::

    python -m reference_experiments train-teacher --arch wrn_40_2 --dataset cifar10-jpeg \\
        --epochs 240 --seed 0 --out teachers/

Under ``torchrun --nproc_per_node=N`` (see ``reference_experiments/distributed.py``)
the model is wrapped in ``DistributedDataParallel``: every rank draws the same
permutation and takes rows ``rank::N`` of each global batch of ``batch_size``
(the hyperparameters keep their single-process meaning); rank 0 evaluates and
saves, and every rank returns the same path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .augment import augment, preprocess_eval
from .data import DATASET_NAMES, ImageDataset, load_dataset
from .devices import autocast as _autocast
from .devices import resolve_device as _resolve_device
from .models import MODEL_NAMES, create_model
from .rows import atomic_write_bytes

__all__ = ["evaluate", "load_teacher", "main", "teacher_name", "train_teacher"]

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


def train_teacher(
    arch: str,
    dataset: ImageDataset,
    *,
    epochs: int,
    seed: int,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    lr: float = 0.05,
    label_smoothing: float = 0.0,
    warmup_epochs: float = 0.0,
    progress: bool = True,
) -> Path:
    """Train ``arch`` on ``dataset``, save it, return the ``.safetensors`` path.

    One epoch = ``len(x_train) // batch_size`` steps over a fresh seeded permutation
    (the incomplete last batch is dropped); lr rises linearly over ``warmup_epochs``
    then follows a per-step cosine from ``lr`` to 0 (Nesterov momentum when warming
    up); cross-entropy with ``label_smoothing``. Data stay as uint8 on ``device``;
    augmentation is batched there.
    """
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    from . import distributed as rdist

    rdist.init_from_env()
    world, rank = rdist.world_size(), rdist.rank()
    dev = rdist.device_for(_resolve_device(device))  # cuda -> cuda:LOCAL_RANK under torchrun
    cuda = dev.type == "cuda"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(arch, dataset.num_classes, dataset.in_channels)
    model.to(dev)
    if cuda:
        # torch's stubs lack Module.to(memory_format=...), which exists at runtime
        cast(Any, model).to(memory_format=torch.channels_last)
    x_train = torch.from_numpy(dataset.x_train).to(dev)
    y_train = torch.from_numpy(dataset.y_train).to(dev)
    n = len(y_train)
    bs = max(1, min(batch_size, n))
    steps_per_epoch = n // bs
    total = max(1, epochs * steps_per_epoch)
    gen = torch.Generator(device=dev).manual_seed(seed)
    perm_gen, net = gen, model
    if world > 1:  # same permutation everywhere, per-rank augmentation
        perm_gen = torch.Generator(device=dev).manual_seed(seed)
        gen.manual_seed(seed + 1_000_003 * rank)
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if cuda else None)
    if bs < world:
        raise ValueError(f"batch_size {bs} < world size {world}")
    # DDP averages per-rank gradients: weigh a shard of n_r of bs rows by n_r * world / bs
    loss_scale = rdist.shard_size(bs) * world / bs
    warm = int(warmup_epochs * steps_per_epoch)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=warm > 0
    )

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        done = min(step - warm, total - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    bar = None
    if progress and rdist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=f"teacher {arch}/{dataset.name}", unit="epoch")
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, device=dev, generator=perm_gen)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        for s in range(steps_per_epoch):
            idx = rdist.shard(perm[s * bs : (s + 1) * bs])
            xb = augment(x_train[idx], dataset, gen)
            yb = y_train[idx]
            with _autocast(dev):
                logits = net(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == yb).sum()
        if world > 1:  # all ranks' rows (one all-reduce per epoch)
            loss_sum = rdist.sum_over_ranks(loss_sum * loss_scale) / world
            correct = rdist.sum_over_ranks(correct)
        if bar is not None:
            seen = steps_per_epoch * bs
            bar.set_postfix(
                loss=f"{loss_sum.item() / steps_per_epoch:.3f}",
                train_acc=f"{correct.item() / seen:.3f}",
                lr=f"{sched.get_last_lr()[0]:.4f}",
            )
            bar.update(1)
    if cuda:
        torch.cuda.synchronize(dev)
    train_seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    path = Path(out_dir) / f"{teacher_name(arch, dataset, epochs, seed)}.safetensors"
    if not rdist.is_main():  # rank 0 evaluates and saves
        rdist.barrier()
        return path
    acc = evaluate(model, dataset, dev)
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "arch": arch,
        "dataset": dataset.name,
        "num_classes": int(dataset.num_classes),
        "in_channels": int(dataset.in_channels),
        "split_seed": dataset.split_seed,
        "epochs": int(epochs),
        "seed": int(seed),
        "batch_size": bs,
        "lr": float(lr),
        "schedule": "cosine-per-step",
        "label_smoothing": float(label_smoothing),
        "warmup_epochs": float(warmup_epochs),
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "test_accuracy": acc,
        "train_seconds": round(train_seconds, 3),
        "train_images_per_s": round(epochs * steps_per_epoch * bs / max(train_seconds, 1e-9), 1),
        "device": str(dev),
        "torch": torch.__version__,
    }
    if world > 1:
        meta["world_size"] = world
    path = save_teacher(model, out_dir, teacher_name(arch, dataset, epochs, seed), meta)
    rdist.barrier()
    return path


def main(argv: list[str] | None = None) -> None:
    """``train-teacher`` command line (a leading ``train-teacher`` token is ignored)."""
    if argv and argv[0] == "train-teacher":
        argv = argv[1:]
    p = argparse.ArgumentParser(
        prog="python -m reference_experiments train-teacher",
        description="Train a teacher; save safetensors weights + JSON metadata.",
    )
    p.add_argument("--arch", required=True, choices=MODEL_NAMES)
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data-dir", default=None, help="data root (default: $CKD_DATA_DIR)")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the train/test split for cars64/digits (default 0)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    dataset = load_dataset(args.dataset, args.data_dir, seed=args.split_seed)
    path = train_teacher(
        args.arch,
        dataset,
        epochs=args.epochs,
        seed=args.seed,
        out_dir=args.out,
        device=args.device,
        batch_size=args.batch_size,
        lr=args.lr,
        progress=not args.no_progress,
    )
    from . import distributed as rdist

    if not rdist.is_main():
        return
    meta = json.loads(path.with_suffix(".json").read_text())
    print(
        f"{path}  test_accuracy={meta['test_accuracy']:.4f}  "
        f"({meta['train_seconds']:.1f} s, {meta['train_images_per_s']:.0f} img/s)"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
