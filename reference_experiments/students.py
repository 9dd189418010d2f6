"""Students under a teacher-call budget: the paper's protocol (issue 3, section 5).

One run (:func:`run_student`):

1. Draw a seeded subset of ``budget`` = n training images; 80% train, 20%
   validation. The teacher is queried **once per training image** through a
   :class:`ckd_core.TeacherBudget` (the validation split is never sent), on
   the clean centre-cropped image (``teacher_view="clean"``) or on one random
   augmentation, cached (``"augmented-once"``, the official behaviour).
   Logits and the features white-box methods need come from the same call.
   ``teacher_calls`` in the result is measured by the budget object.
2. Train the student with :mod:`reference_experiments.methods` on fresh
   augmentations every step, against the cached teacher outputs.
3. Preset ``paper``: SGD (momentum 0.9, wd 5e-4), batch 64 (64 pairs for
   pairwise methods), evaluate on validation every epoch (ceil(train/64)
   steps), early stopping with patience 50 epochs, then reload the best
   checkpoint and decay the lr x0.1, at most 3 decays, at most 1000 epochs;
   ``lr=None`` tries 0.1, 0.05, 0.025 and keeps the best on validation.
   Preset ``fast``: a fixed cosine schedule of 30 epochs (lr 0.05 by
   default), best-validation checkpoint. Either way the reported test
   accuracy is that of the best-validation checkpoint.

GPU hot loop: images (uint8), labels and cached teacher outputs live on the
device; augmentation is batched on the device; all randomness comes from a
device generator; the only host syncs are once per epoch (validation, the
non-finite-loss check, timing). On CUDA the student runs channels-last under
bf16 autocast (losses in float32).

Sharing a GPU between runs: a step is ``sample -> augment -> inputs ->
forward -> loss`` where everything random is drawn up front
(``Method.sample``) and the rest (:func:`step_loss`) is a pure function of
(parameters, buffers, batch tensors). :func:`run_students` stacks runs of
the same dataset / student / method / batch size with ``torch.func``
(``stack_module_state`` + ``functional_call`` + ``vmap(grad(...))``) and
takes one SGD step for all of them; each run keeps its own lr, early-stopping
state and best checkpoint (both presets). Methods whose loss functorch cannot
transform (RKD's autograd.Function; probed at run time) run one by one.

Several GPUs (``torchrun --nproc_per_node=N``, :mod:`reference_experiments.distributed`):
:func:`run_student` trains one run with DDP. ``batch_size`` is the global
batch, and rank r takes rows ``r::N`` of each step's indices (of each side for
pairwise methods). Rank 0 alone queries the teacher and broadcasts the cache.
``ckd_all``/``rkd_dK`` use the global-batch losses, and rank 0 evaluates.
Every rank returns rank 0's row. Stacking is off.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ckd_torch  # noqa: F401  (selects keras' torch backend before ckd_core imports keras)
import numpy as np
import torch
from torch import nn

from ckd_core import TeacherBudget
from reference_experiments import distributed as rdist
from reference_experiments.methods import Batch, Method, MethodSpec, build_method, parse_method

__all__ = [
    "PAPER_LRS",
    "PRESETS",
    "StudentConfig",
    "run_student",
    "run_students",
    "split_subset",
    "step_loss",
]

PAPER_LRS = (0.1, 0.05, 0.025)
TEACHER_VIEWS = ("clean", "augmented-once")


@dataclass(frozen=True)
class Preset:
    """Optimisation schedule."""

    name: str
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_epochs: int = 1000
    schedule: str = "plateau"  # "plateau" (early stopping + decays) or "cosine"
    patience: int = 50
    lr_decay: float = 0.1
    max_decays: int = 3
    default_lr: float = 0.05


PRESETS: dict[str, Preset] = {
    "paper": Preset("paper"),
    "fast": Preset("fast", max_epochs=30, schedule="cosine"),
}


@dataclass
class StudentConfig:
    """One student run. ``budget`` is the subset size n (the paper's x-axis):
    the teacher is called on its 80% training split only, so
    ``teacher_calls`` = n - round(0.2 n) <= n."""

    dataset: str = "digits"
    student_arch: str = "digits_mlp"
    method: str = "kd"
    budget: int = 500
    seed: int = 0
    teacher: str | None = None  # path of a safetensors teacher (or pass teacher= in memory)
    teacher_arch: str | None = None  # informational; taken from the teacher metadata if None
    preset: str = "paper"
    teacher_view: str = "clean"
    lr: float | None = None  # None: chosen on validation from PAPER_LRS ("paper"), 0.05 ("fast")
    batch_size: int = 64
    device: str = "auto"  # "auto": cuda if available
    data_dir: str | None = None
    weights: dict[str, float] | None = None  # overrides of methods.DEFAULT_WEIGHTS
    max_epochs: int | None = None  # cap on the preset's epochs (tests, smoke runs)
    patience: int | None = None  # override of the preset's patience
    val_fraction: float = 0.2
    cache_dir: str | None = None  # where teacher-output caches are kept (None: memory only)
    eval_batch_size: int = 1000
    teacher_batch_size: int = 500
    log_every: int = 0  # print a line every N epochs (0: silent)
    sync_bn: bool = False  # under torchrun: SyncBatchNorm across ranks (CUDA)
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the result row


# ----------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: cuda if available; under torchrun ``cuda`` means ``cuda:LOCAL_RANK``."""
    return rdist.device_for(device)


def split_subset(num_train: int, n: int, seed: int, val_fraction: float = 0.2):
    """Seeded subset of ``n`` training indices -> ``(train_ids, val_ids)``."""
    if not 2 <= n <= num_train:
        raise ValueError(f"budget n={n} must be in [2, {num_train}] (training set size)")
    sub = np.random.default_rng(seed).choice(num_train, size=n, replace=False)
    n_val = min(max(1, int(round(val_fraction * n))), n - 1)
    return np.sort(sub[n_val:]).astype(np.int64), np.sort(sub[:n_val]).astype(np.int64)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _resolve_teacher(teacher: Any, cfg: StudentConfig, device: torch.device):
    """-> (model or None, metadata dict)."""
    if teacher is None and cfg.teacher:
        from reference_experiments import teacher as teacher_mod

        teacher = teacher_mod.load_teacher(cfg.teacher, device)
    if teacher is None:
        return None, {}
    if isinstance(teacher, tuple):
        model, meta = teacher
    else:
        model, meta = teacher, dict(getattr(teacher, "metadata", {}) or {})
    return model.to(device).eval(), dict(meta or {})


def _teacher_arch(model: Any, meta: Mapping[str, Any], cfg: StudentConfig) -> str | None:
    return cfg.teacher_arch or meta.get("arch") or (type(model).__name__ if model else None)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dataset: Any, batch_size: int = 1000
) -> float:
    """Top-1 accuracy (fraction) on uint8 NHWC ``x`` (on the model's device)."""
    from reference_experiments.augment import preprocess_eval

    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), batch_size):
        xb = preprocess_eval(x[start : start + batch_size], dataset)
        with _autocast(x.device):
            pred = model(xb).argmax(1)
        correct += (pred == y[start : start + batch_size]).sum()
    model.train(was_training)
    return float(correct.item()) / max(1, len(x))


def _feature_shapes(model: nn.Module, dataset: Any) -> list[tuple[int, ...]]:
    from reference_experiments.models import feature_shapes

    return [
        tuple(s) for s in feature_shapes(model, (dataset.in_channels, dataset.crop, dataset.crop))
    ]


def _sha_of(meta: Mapping[str, Any], cfg: StudentConfig) -> str:
    for key in ("sha256", "weights_sha256"):
        if meta.get(key):
            return str(meta[key])
    return cfg.teacher or "in-memory"


# ----------------------------------------------------------------------------- teacher
def query_teacher(
    model: nn.Module | None,
    meta: Mapping[str, Any],
    cfg: StudentConfig,
    dataset: Any,
    train_ids: np.ndarray,
    feature_indices: Sequence[int],
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], TeacherBudget]:
    """Cached teacher outputs of ``train_ids`` (device tensors) and the budget."""
    from reference_experiments.augment import augment, preprocess_eval

    if cfg.teacher_view not in TEACHER_VIEWS:
        raise ValueError(f"teacher_view must be one of {TEACHER_VIEWS}, got {cfg.teacher_view!r}")
    feature_indices = tuple(int(i) for i in feature_indices)
    gen = torch.Generator(device=device)
    gen.manual_seed(10_007 * cfg.seed + 1)  # the augmented-once view

    @torch.no_grad()
    def call(x_np: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(x_np)).to(device)
        if cfg.teacher_view == "clean":
            x = preprocess_eval(x, dataset)
        else:
            x = augment(x, dataset, gen)
        with _autocast(device):
            if feature_indices:
                logits, feats = model(x, return_features=True)
            else:
                logits, feats = model(x), []
        out = {"logits": logits.float().cpu().numpy()}
        for i in feature_indices:
            out[f"feat{i}"] = feats[i].to(torch.float16).cpu().numpy()
        return out

    metadata = {
        "teacher": _sha_of(meta, cfg),
        "dataset": dataset.name,
        "view": cfg.teacher_view,
        "seed": cfg.seed,
        "budget": cfg.budget,
        "features": list(feature_indices),
        "train_ids": hashlib.sha256(train_ids.tobytes()).hexdigest()[:16],
    }
    budget = TeacherBudget(
        call if model is not None else None,
        cfg.budget,
        batch_size=cfg.teacher_batch_size,
        metadata=metadata,
    )
    cache_path = None
    if cfg.cache_dir:
        tag = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]
        name = f"teacher-{dataset.name}-n{cfg.budget}-s{cfg.seed}-{tag}.safetensors"
        cache_path = Path(cfg.cache_dir) / name
        if cache_path.exists():
            budget.load(cache_path)
    if model is None and not all(i in budget for i in train_ids.tolist()):
        raise ValueError(f"method {cfg.method!r} needs a teacher (cfg.teacher or teacher=)")
    if model is not None:
        model.eval()
    out = budget.query(train_ids, lambda ids: dataset.x_train[ids])
    if cache_path is not None and budget.new_calls:
        budget.save(cache_path)
    return {k: torch.from_numpy(v).to(device) for k, v in out.items()}, budget


# ----------------------------------------------------------------------------- step
def step_loss(
    student: nn.Module,
    method: Method,
    x: torch.Tensor,
    teacher: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    batch: Batch,
    *,
    need_features: bool,
    autocast_device: torch.device | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pure part of a step: augmented images ``x`` -> (loss, parts)."""
    x = method.inputs(x, batch)
    with _autocast(autocast_device or x.device):
        if need_features:
            logits, feats = student(x, return_features=True)
        else:
            logits, feats = student(x), None
    return method(logits, feats, teacher, labels, batch)


def _wrap_ddp(learner: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel`` over student + method (the method's own
    parameters: CRD embeddings, FitNets/VID regressors). Buffers are not
    broadcast: BatchNorm statistics and CRD's memory bank stay per rank
    (rank 0's are the ones evaluated); ``sync_bn`` normalises over the
    global batch instead."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_bn:
        if device.type != "cuda":
            raise ValueError("sync_bn (SyncBatchNorm) needs CUDA devices")
        learner = nn.SyncBatchNorm.convert_sync_batchnorm(learner)
    ids = [device.index] if device.type == "cuda" else None
    # never synced (not even at init): pair/group index buffers have the
    # rank's shard size, the rest start equal (same seed) and stay per rank
    buffers = [name for name, _ in learner.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(learner, buffers)
    return DDP(learner, device_ids=ids)


def _use_global_losses(method: Method, spec: MethodSpec, seed: int, scale: float) -> None:
    """Under torchrun: CKD all-pairs and RKD_d compare the pairs of the global
    batch (``global_batch=True``: O(dim) all-reduces; their gradients are
    already those of the global batch after DDP's averaging). The step's loss
    is multiplied by ``scale`` (:attr:`_Run.loss_scale`) for the per-rank
    terms; these global terms are divided by it to stay unscaled."""
    if spec.base == "ckd_all":
        method.ckd = ckd_torch.ComparativeLoss(global_batch=True)
        module: nn.Module | None = method.ckd
    elif spec.base == "rkd_d":
        method.rkd_d = ckd_torch.ProjectedRKDLoss(
            out_dim=spec.proj_dim, seed=seed, global_batch=True
        )
        module = method.rkd_d
    else:
        module = None
    if module is not None and scale != 1.0:
        module.register_forward_hook(lambda _m, _args, out: out / scale)


def _epoch_order(
    gen: torch.Generator, n: int, steps: int, per_step: int, device: torch.device
) -> torch.Tensor:
    """``(steps, per_step)`` sample indices: consecutive random permutations."""
    total = steps * per_step
    reps = math.ceil(total / n)
    perms = [torch.randperm(n, generator=gen, device=device) for _ in range(reps)]
    return torch.cat(perms)[:total].view(steps, per_step)


class _Run:
    """State shared by the learning-rate trials of one configuration."""

    def __init__(self, cfg: StudentConfig, dataset: Any, teacher: Any) -> None:
        from reference_experiments import models

        self.cfg = cfg
        rdist.init_from_env()
        self.world, self.rank = rdist.world_size(), rdist.rank()
        self.device = device = resolve_device(cfg.device)
        # this rank's share of each global batch (of each side of a pairwise batch)
        self.local_batch = rdist.shard_size(cfg.batch_size)
        if self.local_batch < 1:
            raise ValueError(f"batch_size {cfg.batch_size} < world size {self.world}")
        if cfg.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {cfg.preset!r}")
        self.preset = PRESETS[cfg.preset]
        self.spec: MethodSpec = parse_method(cfg.method)
        if dataset is None:
            from reference_experiments import data

            dataset = data.load_dataset(cfg.dataset, cfg.data_dir)
        self.dataset = dataset
        self.train_ids, self.val_ids = split_subset(
            len(dataset.x_train), cfg.budget, cfg.seed, cfg.val_fraction
        )
        self.n_train = len(self.train_ids)
        self.t_model, self.t_meta = (None, {})
        if self.spec.uses_teacher:
            self.t_model, self.t_meta = _resolve_teacher(teacher, cfg, device)
        elif isinstance(teacher, tuple):
            self.t_meta = dict(teacher[1] or {})
        self.teacher_arch = _teacher_arch(
            teacher[0] if isinstance(teacher, tuple) else teacher, self.t_meta, cfg
        )
        self.student_shapes = self.teacher_shapes = ()
        probe = models.create_model(cfg.student_arch, dataset.num_classes, dataset.in_channels)
        if self.spec.whitebox is not None:
            self.student_shapes = _feature_shapes(probe, dataset)
            self.teacher_shapes = _feature_shapes(self.t_model, dataset)
        self.feature_indices = self.spec.teacher_feature_indices(len(self.teacher_shapes))
        if self.spec.whitebox == "vid":
            n = min(len(self.student_shapes), len(self.teacher_shapes))
            self.feature_indices = tuple(range(1, n - 1))
        self.budget: TeacherBudget | None = None
        self.tcache: dict[str, torch.Tensor] = {}
        if self.spec.uses_teacher and rdist.is_main():
            # rank 0 alone calls the teacher: the budget is counted once
            self.tcache, self.budget = query_teacher(
                self.t_model,
                self.t_meta,
                cfg,
                dataset,
                self.train_ids,
                self.feature_indices,
                device,
            )
        if self.spec.uses_teacher and self.world > 1:
            self.tcache = rdist.broadcast_tensors(self.tcache, device)
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        self.x_train = to(dataset.x_train[self.train_ids])
        self.y_train = to(dataset.y_train[self.train_ids]).long()
        self.x_val = to(dataset.x_train[self.val_ids])
        self.y_val = to(dataset.y_train[self.val_ids]).long()

    @property
    def teacher_calls(self) -> int:
        return 0 if self.budget is None else self.budget.used

    def new_models(self, lr_index: int) -> tuple[nn.Module, Method]:
        from reference_experiments import models

        cfg, ds = self.cfg, self.dataset
        torch.manual_seed(cfg.seed * 1000 + lr_index)
        student = models.create_model(cfg.student_arch, ds.num_classes, ds.in_channels)
        method = build_method(
            self.spec,
            num_classes=ds.num_classes,
            n_train=self.n_train,
            batch_size=self.local_batch,
            student_shapes=self.student_shapes,
            teacher_shapes=self.teacher_shapes,
            weights=cfg.weights,
            seed=cfg.seed,
        )
        if self.world > 1:
            _use_global_losses(method, self.spec, cfg.seed, self.loss_scale)
        student.to(self.device)
        method.to(self.device)
        if self.device.type == "cuda":
            student.to(memory_format=torch.channels_last)
            method.to(memory_format=torch.channels_last)
        return student, method

    @property
    def loss_scale(self) -> float:
        """``n_r * world / N``: DDP averages per-rank gradients, so a per-rank
        mean over a shard of ``n_r`` of ``N`` samples is scaled by this to
        weigh every sample of the global batch alike (1 for even shards)."""
        return self.local_batch * self.world / self.cfg.batch_size

    def train(self, lr: float, lr_index: int = 0) -> dict[str, Any]:
        """One training run at ``lr``; returns best state and counters."""
        from reference_experiments.augment import augment

        cfg, preset, device = self.cfg, self.preset, self.device
        student, method = self.new_models(lr_index)
        params = [p for m in (student, method) for p in m.parameters() if p.requires_grad]

        def make_opt(lr_now: float) -> torch.optim.Optimizer:
            return torch.optim.SGD(
                params,
                lr=lr_now,
                momentum=preset.momentum,
                weight_decay=preset.weight_decay,
                foreach=device.type == "cuda",
            )

        opt = make_opt(lr)
        max_epochs = (
            preset.max_epochs if cfg.max_epochs is None else min(preset.max_epochs, cfg.max_epochs)
        )
        patience = preset.patience if cfg.patience is None else cfg.patience
        steps = math.ceil(self.n_train / cfg.batch_size)
        per_step = self.spec.images_per_step(cfg.batch_size)  # global batch
        sched = None
        if preset.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs * steps)
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed * 7919 + lr_index)
        need_features = self.spec.whitebox is not None
        world, rank = self.world, self.rank
        order_gen, ddp = gen, None
        if world > 1:
            # the same epoch order on every rank, per-rank augmentation/sampling
            order_gen = torch.Generator(device=device)
            order_gen.manual_seed(cfg.seed * 7919 + lr_index)
            gen.manual_seed(cfg.seed * 7919 + lr_index + 1_000_003 * rank)
            ddp = _wrap_ddp(Learner(student, method, need_features, device), device, cfg.sync_bn)
        side = per_step // (2 if self.spec.pairwise else 1)

        def snapshot() -> tuple[dict, dict]:
            return copy.deepcopy(student.state_dict()), copy.deepcopy(method.state_dict())

        best_val, best_state, best_epoch = -1.0, snapshot(), 0
        since_best = decays = 0
        lr_now = lr
        train_time = 0.0
        images = total_steps = 0
        epoch = 0
        student.train()
        method.train()
        for epoch in range(1, max_epochs + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            order = _epoch_order(order_gen, self.n_train, steps, per_step, device)
            if world > 1:  # rank r: rows r::world of each (side of each) global batch
                order = rdist.shard(order.unflatten(1, (-1, side))).flatten(1)
            loss_sum = torch.zeros((), device=device)
            for s in range(steps):
                idx = order[s]
                batch = method.sample(gen, idx)
                x = augment(self.x_train[idx], self.dataset, gen)
                teacher = {k: v[idx] for k, v in self.tcache.items()}
                if ddp is None:
                    loss, _ = step_loss(
                        student,
                        method,
                        x,
                        teacher,
                        self.y_train[idx],
                        batch,
                        need_features=need_features,
                        autocast_device=device,
                    )
                else:
                    loss, _ = ddp(x, teacher, self.y_train[idx], batch)
                    if self.loss_scale != 1.0:
                        loss = loss * self.loss_scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                loss_sum += loss.detach()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - t0
            images += steps * per_step
            total_steps += steps
            mean_loss = float(rdist.sum_over_ranks(loss_sum).item()) / (steps * world)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"non-finite training loss ({mean_loss}) in epoch {epoch} of "
                    f"{cfg.method} ({cfg.student_arch}, budget {cfg.budget}, seed {cfg.seed}, "
                    f"lr {lr_now:g}); lower the lr or check the teacher outputs"
                )
            if rdist.is_main():
                val = evaluate(student, self.x_val, self.y_val, self.dataset, cfg.eval_batch_size)
            else:
                val = 0.0
            val = rdist.broadcast_float(val)  # the same decisions on every rank
            if cfg.log_every and rdist.is_main() and epoch % cfg.log_every == 0:
                print(
                    f"[{cfg.method} lr={lr:g}] epoch {epoch} loss {mean_loss:.4f} "
                    f"val {val:.4f} lr {lr_now:g}",
                    flush=True,
                )
            if val > best_val:
                best_val, best_state, best_epoch, since_best = val, snapshot(), epoch, 0
            else:
                since_best += 1
            if preset.schedule == "plateau" and since_best >= patience:
                if decays >= preset.max_decays:
                    break
                decays += 1
                lr_now *= preset.lr_decay
                student.load_state_dict(best_state[0])
                method.load_state_dict(best_state[1])
                opt = make_opt(lr_now)
                since_best = 0
        student.load_state_dict(best_state[0])
        method.load_state_dict(best_state[1])
        return {
            "student": student,
            "best_val_acc": best_val,
            "best_epoch": best_epoch,
            "epochs": epoch,
            "steps": total_steps,
            "images": images,
            "train_time": train_time,
            "decays": decays,
        }


def run_student(cfg: StudentConfig, *, dataset: Any = None, teacher: Any = None) -> dict:
    """Runs one configuration; returns its result row (see module docstring).

    ``dataset``: an ``ImageDataset`` (else ``load_dataset(cfg.dataset)``);
    ``teacher``: an ``nn.Module`` or ``(model, metadata)`` (else loaded from
    ``cfg.teacher``); not needed for ``method="ce"``.
    """
    t_start = time.perf_counter()
    run = _Run(cfg, dataset, teacher)
    preset = run.preset
    if cfg.lr is not None:
        lrs = [float(cfg.lr)]
    elif preset.name == "paper":
        lrs = list(PAPER_LRS)
    else:
        lrs = [preset.default_lr]
    best = None
    train_time = 0.0
    images = steps = 0
    diverged: list[float] = []
    for i, lr in enumerate(lrs):
        try:
            out = run.train(lr, i)
        except FloatingPointError:
            # A candidate lr that diverges loses the validation selection;
            # the error stands when no candidate is left (or none was chosen).
            if len(lrs) == 1 or (len(diverged) == len(lrs) - 1 and best is None):
                raise
            diverged.append(lr)
            continue
        train_time += out["train_time"]
        images += out["images"]
        steps += out["steps"]
        if best is None or out["best_val_acc"] > best["best_val_acc"]:
            best = {**out, "lr": lr}
        else:
            del out
    assert best is not None
    test_acc = float("nan")
    if rdist.is_main():  # under torchrun rank 0 evaluates; its row is every rank's
        x_test = torch.from_numpy(np.ascontiguousarray(run.dataset.x_test)).to(run.device)
        y_test = torch.from_numpy(np.ascontiguousarray(run.dataset.y_test)).to(run.device).long()
        test_acc = evaluate(best["student"], x_test, y_test, run.dataset, cfg.eval_batch_size)
    row = {
        "dataset": run.dataset.name,
        "teacher_arch": run.teacher_arch,
        "student_arch": cfg.student_arch,
        "method": cfg.method,
        "budget": cfg.budget,
        "teacher_calls": run.teacher_calls,
        "seed": cfg.seed,
        "preset": preset.name,
        "teacher_view": cfg.teacher_view,
        "lr": best["lr"],
        "lrs_tried": lrs,
        "lrs_diverged": diverged,
        "best_val_acc": best["best_val_acc"],
        "test_acc": test_acc,
        "best_epoch": best["best_epoch"],
        "epochs": best["epochs"],
        "steps": best["steps"],  # of the chosen lr's training run
        "total_steps": steps,  # all lr trials
        "train_images_per_s": images / train_time if train_time > 0 else float("nan"),
        "wall_s": time.perf_counter() - t_start,
        "n_train": run.n_train,
        "n_val": len(run.val_ids),
        "new_teacher_calls": 0 if run.budget is None else run.budget.new_calls,
        "device": str(run.device),
        **cfg.extra,
    }
    if run.world > 1:
        row["world_size"] = run.world
        row = rdist.broadcast_object(row)
    return row


class Learner(nn.Module):
    """Student + method as one module: ``forward`` is :func:`step_loss`
    (``predict=True``: the student's logits), so ``torch.func.functional_call``
    over stacked parameters gives the step of many runs at once."""

    def __init__(
        self, student: nn.Module, method: Method, need_features: bool, device: torch.device
    ) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.need_features = need_features
        self.autocast_device = device

    def forward(self, x, teacher=None, labels=None, batch=None, predict: bool = False):
        if predict:
            with _autocast(self.autocast_device):
                return self.student(x).float()
        return step_loss(
            self.student,
            self.method,
            x,
            teacher,
            labels,
            batch,
            need_features=self.need_features,
            autocast_device=self.autocast_device,
        )


def _group_key(cfg: StudentConfig) -> tuple:
    keys = (
        "dataset",
        "student_arch",
        "method",
        "budget",
        "batch_size",
        "preset",
        "teacher",
        "teacher_view",
        "max_epochs",
        "patience",
        "device",
        "val_fraction",
    )
    return tuple(getattr(cfg, k) for k in keys) + (json.dumps(cfg.weights, sort_keys=True),)


def run_students(
    cfgs: Sequence[StudentConfig],
    *,
    dataset: Any = None,
    teacher: Any = None,
    max_stack: int = 32,
) -> list[dict]:
    """Runs many configurations, stacking compatible ones into one step.

    Runs that share dataset, student, method, budget, batch size, preset and
    teacher (they may differ in seed and lr) are trained together: their
    parameters are stacked (``torch.func.stack_module_state``) and one
    ``vmap(grad(functional_call(...)))`` computes every run's step, followed
    by one stacked SGD update (momentum, weight decay, per-run lr and
    early-stopping state). ``lr=None`` in the ``paper`` preset puts the
    three candidate lrs in the stack and keeps the best on validation.
    Methods that functorch cannot transform (RKD) run one by one.
    Rows come back in the order of ``cfgs``, with the :func:`run_student`
    keys plus ``stacked_runs`` and ``stack_images_per_s`` (all runs' images
    per second); ``train_images_per_s`` is one run's share.

    Randomness differs from :func:`run_student` (one generator per stack),
    so a stacked run is not bit-identical to the same run alone.
    """
    rows: list[dict | None] = [None] * len(cfgs)
    groups: dict[tuple, list[int]] = {}
    rdist.init_from_env()
    for i, c in enumerate(cfgs):
        if rdist.world_size() > 1 or not parse_method(c.method).stackable:
            # (under torchrun: DDP runs one by one, no vmapped stacks)
            rows[i] = run_student(c, dataset=dataset, teacher=teacher)
            continue
        groups.setdefault(_group_key(c), []).append(i)
    for members in groups.values():
        if not _vmappable(cfgs[members[0]], dataset):
            for i in members:
                rows[i] = run_student(cfgs[i], dataset=dataset, teacher=teacher)
            continue
        for start in range(0, len(members), max_stack):
            chunk = members[start : start + max_stack]
            for i, row in zip(
                chunk, _run_stack([cfgs[i] for i in chunk], dataset, teacher), strict=True
            ):
                rows[i] = row
    return [r for r in rows if r is not None]


_VMAPPABLE: dict[str, bool] = {}


def _vmappable(cfg: StudentConfig, dataset: Any) -> bool:
    """Whether the method's loss runs under ``vmap(grad(...))``: probed once
    per method on random logits (a loss implemented with an
    ``autograd.Function`` lacking ``setup_context`` makes functorch refuse)."""
    spec = parse_method(cfg.method)
    if not spec.stackable:
        return False
    if spec.base in _VMAPPABLE:
        return _VMAPPABLE[spec.base]
    from torch.func import functional_call, grad, stack_module_state, vmap

    classes, b = 5, 4
    method = build_method(
        dataclasses.replace(spec, whitebox=None), num_classes=classes, n_train=16, batch_size=b
    )
    params, buffers = stack_module_state([method, copy.deepcopy(method)])
    base = copy.deepcopy(method).to("meta")
    m = method.images_per_step
    idx = torch.stack([torch.randperm(16)[:m] for _ in range(2)])
    batch = method.sample(None, idx)

    def loss(p, bufs, s, t, y, bt):
        return functional_call(base, (p, bufs), (s, None, {"logits": t}, y, bt))[0]

    try:
        vmap(grad(loss, argnums=2))(
            params,
            buffers,
            torch.randn(2, m, classes),
            torch.randn(2, m, classes),
            torch.randint(0, classes, (2, m)),
            batch,
        )
        ok = True
    except RuntimeError as err:
        if "functorch" not in str(err) and "vmap" not in str(err):
            raise
        ok = False
    _VMAPPABLE[spec.base] = ok
    return ok


def _stacked_sgd(params, grads, bufs, lr_view, momentum: float, wd: float) -> None:
    keys = list(params)
    p = [params[k] for k in keys]
    g = [grads[k] for k in keys]
    b = [bufs[k] for k in keys]
    torch._foreach_add_(g, p, alpha=wd)
    torch._foreach_mul_(b, momentum)
    torch._foreach_add_(b, g)
    torch._foreach_sub_(p, torch._foreach_mul(b, [lr_view(t) for t in p]))


def _run_stack(cfgs: Sequence[StudentConfig], dataset: Any, teacher: Any) -> list[dict]:
    from torch.func import functional_call, grad, stack_module_state, vmap

    from reference_experiments.augment import augment, preprocess_eval

    t_start = time.perf_counter()
    cfg0 = cfgs[0]
    preset = PRESETS[cfg0.preset]
    # one entry per trained model: (config index, lr)
    trials: list[tuple[int, float]] = []
    for i, c in enumerate(cfgs):
        if c.lr is not None:
            trials.append((i, float(c.lr)))
        elif preset.name == "paper":
            trials += [(i, lr) for lr in PAPER_LRS]
        else:
            trials.append((i, preset.default_lr))
    runs = [_Run(c, dataset, teacher) for c in cfgs]
    dataset = runs[0].dataset
    device = runs[0].device
    spec = runs[0].spec
    n_r = len(trials)
    learners = []
    for j, (i, _) in enumerate(trials):
        student, method = runs[i].new_models(j)
        learners.append(Learner(student, method, spec.whitebox is not None, device))
    params, buffers = stack_module_state(learners)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(learners[0]).to("meta")
    method0 = learners[0].method
    del learners

    def pick(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([ts[i] for i, _ in trials])

    x_train = pick([r.x_train for r in runs])  # (R, n, H, W, C) uint8
    y_train = pick([r.y_train for r in runs])
    tcache = {k: pick([r.tcache[k] for r in runs]) for k in runs[0].tcache}
    x_val = pick([r.x_val for r in runs])
    y_val = pick([r.y_val for r in runs])
    n_train = runs[0].n_train
    rows_r = torch.arange(n_r, device=device)[:, None]

    def loss_fn(p, b, x, t, y, batch):
        loss, parts = functional_call(base, (p, b), (x, t, y, batch))
        return loss, loss.detach()

    step_grad = vmap(grad(loss_fn, has_aux=True))

    def predict(p, b, x):
        return functional_call(base, (p, b), (x,), {"predict": True})

    @torch.no_grad()
    def accuracy(x_u8: torch.Tensor, y: torch.Tensor, shared: bool) -> torch.Tensor:
        """Per-run accuracy, (R,); ``shared``: one image set for all runs."""
        base.eval()
        correct = torch.zeros(n_r, device=device)
        chunk = max(1, cfg0.eval_batch_size // (1 if shared else n_r))
        n = x_u8.shape[0] if shared else x_u8.shape[1]
        for s0 in range(0, n, chunk):
            if shared:
                xb = preprocess_eval(x_u8[s0 : s0 + chunk], dataset)
                logits = vmap(predict, in_dims=(0, 0, None))(params, buffers, xb)
                yb = y[s0 : s0 + chunk][None]
            else:
                xs = x_u8[:, s0 : s0 + chunk]
                xb = preprocess_eval(xs.flatten(0, 1), dataset).unflatten(0, xs.shape[:2])
                logits = vmap(predict)(params, buffers, xb)
                yb = y[:, s0 : s0 + chunk]
            correct += (logits.argmax(-1) == yb).sum(-1)
        base.train()
        return correct / n

    lr_base = torch.tensor([lr for _, lr in trials], device=device)
    lr_scale = torch.ones(n_r, device=device)  # decays (plateau) / freeze (0)

    def lr_view(t: torch.Tensor) -> torch.Tensor:
        return lr_now.view(-1, *([1] * (t.dim() - 1)))

    momentum_bufs = {k: torch.zeros_like(v) for k, v in params.items()}
    max_epochs = (
        preset.max_epochs if cfg0.max_epochs is None else min(preset.max_epochs, cfg0.max_epochs)
    )
    patience = preset.patience if cfg0.patience is None else cfg0.patience
    steps = math.ceil(n_train / cfg0.batch_size)
    per_step = method0.images_per_step
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg0.seed * 7919 + 17)
    best_params = {k: v.clone() for k, v in params.items()}
    best_buffers = {k: v.clone() for k, v in buffers.items()}
    best_val = [-1.0] * n_r
    best_epoch = [0] * n_r
    since_best = [0] * n_r
    decays = [0] * n_r
    done = [False] * n_r
    last_epoch = [0] * n_r
    train_time = 0.0
    total_steps = 0
    epoch = 0
    base.train()

    def where_runs(mask: torch.Tensor, a: dict, b: dict) -> None:
        """``b[k][r] = a[k][r]`` for runs where ``mask``."""
        for k in b:
            m = mask.view(-1, *([1] * (b[k].dim() - 1)))
            b[k].copy_(torch.where(m, a[k], b[k]))

    for epoch in range(1, max_epochs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        reps = math.ceil(steps * per_step / n_train)
        keys = torch.rand((n_r, reps, n_train), device=device, generator=gen)
        order = keys.argsort(-1).flatten(1)[:, : steps * per_step].view(n_r, steps, per_step)
        loss_sum = torch.zeros(n_r, device=device)
        for s in range(steps):
            idx = order[:, s]  # (R, M)
            batch = method0.sample(gen, idx)
            imgs = x_train[rows_r, idx]  # (R, M, H, W, C)
            x = augment(imgs.flatten(0, 1), dataset, gen).unflatten(0, idx.shape)
            t = {k: v[rows_r, idx] for k, v in tcache.items()}
            grads, loss = step_grad(params, buffers, x, t, y_train[rows_r, idx], batch)
            it = (epoch - 1) * steps + s
            if preset.schedule == "cosine":
                factor = 0.5 * (1 + math.cos(math.pi * it / (max_epochs * steps)))
            else:
                factor = 1.0
            lr_now = lr_base * lr_scale * factor
            _stacked_sgd(
                params, grads, momentum_bufs, lr_view, preset.momentum, preset.weight_decay
            )
            loss_sum += loss.detach()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        total_steps += steps
        losses = (loss_sum / steps).tolist()
        for r, value in enumerate(losses):
            if not done[r] and not math.isfinite(value):
                i, lr = trials[r]
                c = cfgs[i]
                raise FloatingPointError(
                    f"non-finite training loss ({value}) in epoch {epoch} of {c.method} "
                    f"({c.student_arch}, budget {c.budget}, seed {c.seed}, lr {lr:g}, stacked)"
                )
        val = accuracy(x_val, y_val, shared=False).tolist()
        improved = torch.zeros(n_r, dtype=torch.bool)
        reload = torch.zeros(n_r, dtype=torch.bool)
        for r in range(n_r):
            if done[r]:
                continue
            last_epoch[r] = epoch
            if val[r] > best_val[r]:
                best_val[r], best_epoch[r], since_best[r] = val[r], epoch, 0
                improved[r] = True
            else:
                since_best[r] += 1
            if preset.schedule == "plateau" and since_best[r] >= patience:
                if decays[r] >= preset.max_decays:
                    done[r] = True
                    lr_scale[r] = 0.0
                else:
                    decays[r] += 1
                    lr_scale[r] *= preset.lr_decay
                    since_best[r] = 0
                    reload[r] = True
        improved_d, reload_d = improved.to(device), reload.to(device)
        where_runs(improved_d, params, best_params)
        where_runs(improved_d, buffers, best_buffers)
        if reload.any():
            where_runs(reload_d, best_params, params)
            where_runs(reload_d, best_buffers, buffers)
            zeros = {k: torch.zeros_like(v) for k, v in momentum_bufs.items()}
            where_runs(reload_d, zeros, momentum_bufs)
        if cfg0.log_every and epoch % cfg0.log_every == 0:
            print(f"[stack {cfg0.method} x{n_r}] epoch {epoch} val {val}", flush=True)
        if all(done):
            break
    params, buffers = best_params, best_buffers
    x_test = torch.from_numpy(np.ascontiguousarray(dataset.x_test)).to(device)
    y_test = torch.from_numpy(np.ascontiguousarray(dataset.y_test)).to(device).long()
    test_acc = accuracy(x_test, y_test, shared=True).tolist()
    wall = time.perf_counter() - t_start
    images_per_run = total_steps * per_step
    out = []
    for i, c in enumerate(cfgs):
        mine = [r for r, (ci, _) in enumerate(trials) if ci == i]
        r = max(mine, key=lambda q: best_val[q])
        run = runs[i]
        out.append(
            {
                "dataset": dataset.name,
                "teacher_arch": run.teacher_arch,
                "student_arch": c.student_arch,
                "method": c.method,
                "budget": c.budget,
                "teacher_calls": run.teacher_calls,
                "seed": c.seed,
                "preset": preset.name,
                "teacher_view": c.teacher_view,
                "lr": trials[r][1],
                "lrs_tried": [trials[q][1] for q in mine],
                "best_val_acc": best_val[r],
                "test_acc": test_acc[r],
                "best_epoch": best_epoch[r],
                "epochs": last_epoch[r],
                "steps": last_epoch[r] * steps,
                "total_steps": total_steps * len(mine),
                "train_images_per_s": images_per_run / train_time,
                "stack_images_per_s": images_per_run * n_r / train_time,
                "stacked_runs": n_r,
                "wall_s": wall,
                "n_train": run.n_train,
                "n_val": len(run.val_ids),
                "new_teacher_calls": 0 if run.budget is None else run.budget.new_calls,
                "device": str(device),
                **c.extra,
            }
        )
    return out
