"""The training engine: one loop for every student run, alone or stacked.

:func:`train` trains a *stack* of runs -- configs that agree on
:meth:`RunConfig.stack_key` (they may differ in seed and lr) -- and a single
run is a stack of one. Each run's candidate lrs are *trials*; every trial has
its own parameters, buffers, generator, schedule and best checkpoint, and all
trials take one step together:

1. per trial, the method draws the step (:meth:`Method.epoch_order`,
   :meth:`Method.sample`) and the crops (:func:`augment.draw_crops`) from the
   trial's generator, seeded by the run's seed alone -- so a trial draws the same
   numbers alone or stacked, and the lrs of one seed share init and data order;
2. the augmented images, cached teacher outputs and labels of every trial
   are stacked, and ``torch.func.vmap(grad(...))`` of
   ``functional_call(learner, ...)`` gives every trial's gradient in one call
   (a lone trial, or a method whose loss functorch cannot transform: one
   ``autograd.grad`` per trial, same update);
3. one SGD step (momentum 0.9, weight decay 5e-4) for all trials, each at its
   own lr (:class:`protocol.Schedule`).

After each epoch every trial is evaluated on its validation split and follows
the protocol (:mod:`.protocol`): new best -> checkpoint; plateau -> reload the
best checkpoint, lr x 0.1, momentum kept; done -> the trial leaves the stack.
A trial whose epoch loss is not finite is *diverged*: it leaves the stack and
its lr is not selectable. Each run's row reports the trial with the best
validation accuracy (:func:`protocol.best_on_validation`), its test accuracy
and its representation spectrum (:mod:`.spectrum`). The only host syncs are
once per epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ckd_torch  # noqa: F401  (selects keras' torch backend before ckd_core imports keras)
import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from . import methods
from .augment import crop_and_flip, draw_crops, preprocess_eval
from .config import RunConfig
from .data import ImageDataset, load_dataset
from .devices import autocast, resolve_device
from .models import create_model, feature_shapes
from .protocol import Event, Schedule, best_on_validation
from .rows import ResultRow
from .spectrum import flat_dims, within_class_spectrum
from .teacher_cache import query_teacher, split_subset

__all__ = ["Learner", "train"]

Teacher = tuple[nn.Module, Mapping[str, Any]]
Tensors = dict[str, torch.Tensor]


class Learner(nn.Module):
    """Student + method as one module, so ``functional_call`` over stacked
    parameters runs a step (``forward``) or a prediction (``predict``)."""

    def __init__(self, student: nn.Module, method: methods.Method, device: torch.device) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.device_type = device

    def _student(self, x: torch.Tensor, with_features: bool):
        with autocast(self.device_type):
            if with_features:
                return self.student(x, return_features=True)
            return self.student(x), None

    def forward(self, x, teacher=None, labels=None, batch=None):
        """The step's loss; with ``x`` alone, ``(logits, penultimate features)`` in float32."""
        if teacher is None:
            return self.predict(x)
        loss, _ = self.method.step(self._student, x, teacher, labels, batch)
        return loss

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device_type):
            logits, feats = self.student(x, return_features=True)
        return logits.float(), feats[-1].float().flatten(1)


@dataclass
class _Run:
    """One config's data: its subset on the device and its teacher cache."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    teacher: Tensors
    calls: int
    new_calls: int


def _to(device: torch.device, a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _stack(dicts: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def _select(tensors: Tensors, keep: torch.Tensor) -> Tensors:
    return {k: v[keep] for k, v in tensors.items()}


def _sgd(params: Tensors, grads: Tensors, momentum: Tensors, lr: torch.Tensor, cfg: Any) -> None:
    """In-place SGD with momentum and weight decay (``torch.optim.SGD`` semantics), per-trial lr."""
    keys = list(params)
    p, g, b = ([d[k] for k in keys] for d in (params, grads, momentum))
    torch._foreach_add_(g, p, alpha=cfg.weight_decay)
    torch._foreach_mul_(b, cfg.momentum)
    torch._foreach_add_(b, g)
    lrs = [lr.view(-1, *([1] * (t.dim() - 1))).to(t.dtype) for t in p]
    torch._foreach_sub_(p, torch._foreach_mul(b, lrs))


def _resolve_teacher(
    cfg: RunConfig, teacher: Teacher | None, device: torch.device
) -> tuple[nn.Module | None, dict[str, Any]]:
    if teacher is None and cfg.teacher:
        from .teacher import load_teacher

        teacher = load_teacher(cfg.teacher, device)
    if teacher is None:
        return None, {}
    model, meta = teacher
    return model.to(device).eval(), dict(meta)


def train(
    configs: Sequence[RunConfig],
    *,
    dataset: ImageDataset | None = None,
    teacher: Teacher | None = None,
    log: Callable[[str], None] | None = None,
) -> list[tuple[RunConfig, ResultRow]]:
    """Trains ``configs`` (one stack) and returns ``(config, row)`` per config, in order.

    ``dataset``/``teacher`` (``(model, metadata)``) may be given to skip loading
    them; ``log`` receives one line per epoch.
    """
    t_start = time.perf_counter()
    configs = [c.validate() for c in configs]
    keys = {c.stack_key() for c in configs}
    if len(keys) != 1:
        raise ValueError("configs of one stack must agree on everything but seed and lr")
    cfg0 = configs[0]
    device = resolve_device(cfg0.device)
    preset = cfg0.preset_spec
    method_cls = methods.get(cfg0.method)
    if dataset is None:
        dataset = load_dataset(cfg0.dataset, cfg0.data_dir)
    t_model, t_meta = _resolve_teacher(cfg0, teacher, device)
    image_shape = (dataset.in_channels, dataset.crop, dataset.crop)
    s_shapes: list[tuple[int, ...]] = []
    t_shapes: list[tuple[int, ...]] = []
    if method_cls.whitebox:
        if t_model is None:
            raise ValueError(f"method {cfg0.method!r} needs a teacher (--teacher PATH)")
        probe = create_model(cfg0.student_arch, dataset.num_classes, dataset.in_channels)
        s_shapes = feature_shapes(probe, image_shape)
        t_shapes = feature_shapes(t_model, image_shape)

    # ------------------------------------------------------------ runs and trials
    runs: list[_Run] = []
    trials: list[tuple[int, float]] = []  # (run index, lr)
    learners: list[Learner] = []
    gens: list[torch.Generator] = []
    contexts: list[methods.MethodContext] = []
    for i, cfg in enumerate(configs):
        train_ids, val_ids = split_subset(len(dataset.x_train), cfg.budget, cfg.seed)
        y_train = _to(device, dataset.y_train[train_ids]).long()
        ctx = methods.MethodContext(
            num_classes=dataset.num_classes,
            n_train=len(train_ids),
            batch_size=cfg.batch_size,
            labels=y_train,
            seed=cfg.seed,
            weights=dict(cfg.weights),
            student_shapes=s_shapes,
            teacher_shapes=t_shapes,
        )
        contexts.append(ctx)
        for lr in cfg.lrs:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # the lrs of one seed share their init
                student = create_model(cfg.student_arch, dataset.num_classes, dataset.in_channels)
                method = methods.build(cfg.method, ctx)
            learner = Learner(student, method, device).to(device)
            if device.type == "cuda":
                learner.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack memory_format
            learners.append(learner)
            trials.append((i, float(lr)))
            gens.append(torch.Generator(device=device).manual_seed(7919 * cfg.seed + 17))
        cache, calls, new_calls = {}, 0, 0
        if method_cls.uses_teacher:
            feature_ids = learners[-1].method.teacher_features(len(t_shapes))
            got = query_teacher(t_model, t_meta, cfg, dataset, train_ids, feature_ids, device)
            cache, calls, new_calls = got.outputs, got.calls, got.new_calls
        runs.append(
            _Run(
                _to(device, dataset.x_train[train_ids]),
                y_train,
                _to(device, dataset.x_train[val_ids]),
                _to(device, dataset.y_train[val_ids]).long(),
                cache,
                calls,
                new_calls,
            )
        )

    # ------------------------------------------------------------ stacked state
    n_trials = len(trials)
    samplers = [learner.method for learner in learners]
    params, buffers = stack_module_state(learners)
    params = {k: v.detach() for k, v in params.items()}
    with torch.device("meta"):  # a template for functional_call (cheaper than a deepcopy)
        base = Learner(
            create_model(cfg0.student_arch, dataset.num_classes, dataset.in_channels),
            methods.build(cfg0.method, contexts[0]),
            device,
        )
    per_trial = [runs[i] for i, _ in trials]
    x_train = torch.stack([r.x_train for r in per_trial])
    y_train = torch.stack([r.y_train for r in per_trial])
    t_cache = _stack([r.teacher for r in per_trial]) if method_cls.uses_teacher else {}
    x_val = torch.stack([r.x_val for r in per_trial])
    y_val = torch.stack([r.y_val for r in per_trial])
    lr_base = torch.tensor([lr for _, lr in trials], device=device)
    momentum = {k: torch.zeros_like(v) for k, v in params.items()}
    best_params = {k: v.clone() for k, v in params.items()}
    best_buffers = {k: v.clone() for k, v in buffers.items()}
    steps_per_epoch = math.ceil(runs[0].y_train.numel() / cfg0.batch_size)  # the official epoch
    schedules = [
        Schedule.of(preset, c.epoch_cap, c.patience, steps_per_epoch)
        for c in configs
        for _ in c.lrs
    ]
    active = list(range(n_trials))  # trials still training, in stack order
    final: dict[int, tuple[Tensors, Tensors]] = {}  # finished trial -> its best state
    diverged: set[int] = set()
    train_time, images, step_no = 0.0, 0, 0

    def loss_fn(p, b, x, t, y, batch):
        loss = functional_call(base, (p, b), (x, t, y, batch))
        return loss, loss.detach()

    def per_trial_grads(p, b, x, t, y, batch):
        """The same step without functorch: one ``autograd.grad`` per trial."""
        grads, losses = [], []
        for j in range(x.shape[0]):
            pj = {k: v[j].clone().requires_grad_() for k, v in p.items()}
            bj = {k: v[j] for k, v in b.items()}  # views: BatchNorm updates land in place
            tj, bat = {k: v[j] for k, v in t.items()}, {k: v[j] for k, v in batch.items()}
            loss = functional_call(base, (pj, bj), (x[j], tj, y[j], bat))
            g = torch.autograd.grad(loss, list(pj.values()), allow_unused=True)
            grads.append(
                {
                    k: torch.zeros_like(v) if gk is None else gk
                    for (k, v), gk in zip(pj.items(), g, strict=True)
                }
            )
            losses.append(loss.detach())
        return _stack(grads), torch.stack(losses)

    # vmap shares one step among trials; a lone trial (or a method functorch refuses)
    # takes the plain autograd path, which is faster for one (measured on CPU)
    vmapped = vmap(grad(loss_fn, has_aux=True))

    def predict(p, b, x):
        return functional_call(base, (p, b), (x,))

    @torch.no_grad()
    def evaluate(p: Tensors, b: Tensors, x_u8: torch.Tensor, y: torch.Tensor, shared: bool):
        """Per-trial accuracy ``(R,)``, whether every output was finite ``(R,)`` and
        penultimate features ``(R, N, D)`` (``shared``: one image set for all trials)."""
        base.eval()
        r = next(iter(p.values())).shape[0]
        correct = torch.zeros(r, device=device)
        finite = torch.ones(r, dtype=torch.bool, device=device)
        feats = []
        chunk = max(1, cfg0.eval_batch_size // (1 if shared else r))
        n = x_u8.shape[0] if shared else x_u8.shape[1]
        for s0 in range(0, n, chunk):
            if shared:
                xb = preprocess_eval(x_u8[s0 : s0 + chunk], dataset)
                logits, f = vmap(predict, in_dims=(0, 0, None))(p, b, xb)
                yb = y[s0 : s0 + chunk][None]
            else:
                xs = x_u8[:, s0 : s0 + chunk]
                xb = preprocess_eval(xs.flatten(0, 1), dataset).unflatten(0, xs.shape[:2])
                logits, f = vmap(predict)(p, b, xb)
                yb = y[:, s0 : s0 + chunk]
            correct += (logits.argmax(-1) == yb).sum(-1)
            finite &= torch.isfinite(logits).flatten(1).all(1)
            if shared:
                feats.append(f)
        base.train()
        return correct / n, finite, (torch.cat(feats, dim=1) if feats else None)

    base.train()
    epoch = 0
    while active:
        epoch += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        active_index = torch.tensor(active, device=device)
        orders = [samplers[j].epoch_order(gens[j]) for j in active]
        loss_sum = torch.zeros(len(active), device=device)
        size = (x_train.shape[2], x_train.shape[3])
        for s in range(steps_per_epoch):
            batch = _stack(
                [samplers[j].sample(gens[j], orders[a][s]) for a, j in enumerate(active)]
            )
            idx = batch["idx"]  # (R, M)
            crops = torch.stack([draw_crops(idx.shape[1], size, dataset, gens[j]) for j in active])
            sel = active_index[:, None]
            imgs = x_train[sel, idx]
            x = crop_and_flip(imgs.flatten(0, 1), crops.flatten(0, 1), dataset)
            x = x.unflatten(0, idx.shape)
            t = {k: v[sel, idx] for k, v in t_cache.items()}
            step_grads = vmapped if method_cls.vmappable and len(active) > 1 else per_trial_grads
            grads, loss = step_grads(params, buffers, x, t, y_train[sel, idx], batch)
            factors = [schedules[j].lr_factor(step_no) for j in active]
            lr_now = lr_base[active_index] * torch.tensor(factors, device=device)
            _sgd(params, grads, momentum, lr_now, preset)
            loss_sum += loss.detach().float()
            step_no += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        images += steps_per_epoch * idx.shape[1] * len(active)
        val, ok, _ = evaluate(params, buffers, x_val[active_index], y_val[active_index], False)
        ok &= torch.stack([torch.isfinite(v).flatten(1).all(1) for v in params.values()]).all(0)
        # diverged: the epoch's loss, a parameter or a validation output is not finite
        mean_loss = torch.where(ok, loss_sum / steps_per_epoch, torch.nan).tolist()
        val_list = val.tolist()
        improved, reload, leave = [], [], []
        for a, j in enumerate(active):
            if not math.isfinite(mean_loss[a]):  # the loss or a parameter blew up
                diverged.add(j)
                schedules[j].done, schedules[j].epoch = True, epoch
                leave.append(a)
                continue
            event = schedules[j].update(val_list[a])
            if schedules[j].best_epoch == schedules[j].epoch:
                improved.append(a)
            if event is Event.NEXT_PHASE:
                reload.append(a)
            elif event is Event.DONE:
                leave.append(a)
        _copy_rows(improved, params, best_params)
        _copy_rows(improved, buffers, best_buffers)
        _copy_rows(reload, best_params, params)
        _copy_rows(reload, best_buffers, buffers)
        if log is not None:
            cap = max(schedules[j].max_epochs for j in active)
            elapsed = time.perf_counter() - t_start
            eta = elapsed / epoch * (cap - epoch)
            line = ", ".join(
                f"{configs[trials[j][0]].method} s{configs[trials[j][0]].seed} "
                f"lr {trials[j][1]:g} (now {trials[j][1] * schedules[j].lr_factor(step_no):.3g}) "
                f"val {val_list[a]:.3f}"
                for a, j in enumerate(active)
            )
            log(f"epoch {epoch}/{cap} ({elapsed:.0f} s, at most {eta:.0f} s left): {line}")
        if leave:
            for a in leave:
                j = active[a]
                final[j] = (
                    {k: v[a].clone() for k, v in best_params.items()},
                    {k: v[a].clone() for k, v in best_buffers.items()},
                )
            kept = [a for a in range(len(active)) if a not in leave]
            keep = torch.tensor(kept, device=device, dtype=torch.long)
            active = [j for a, j in enumerate(active) if a not in leave]
            params, buffers, momentum = (_select(d, keep) for d in (params, buffers, momentum))
            best_params, best_buffers = _select(best_params, keep), _select(best_buffers, keep)

    # ------------------------------------------------------------ test and rows
    all_p = _stack([final[j][0] for j in range(n_trials)])
    all_b = _stack([final[j][1] for j in range(n_trials)])
    x_test, y_test = _to(device, dataset.x_test), _to(device, dataset.y_test).long()
    test_acc, _, test_feats = evaluate(all_p, all_b, x_test, y_test, shared=True)
    wall = time.perf_counter() - t_start
    out = []
    for i, cfg in enumerate(configs):
        mine = [j for j, (ri, _) in enumerate(trials) if ri == i]
        ok = [j for j in mine if j not in diverged]
        chosen = best_on_validation(ok, lambda j: schedules[j].best_val)
        spec: list[float] = []
        dims = None
        if chosen is not None and bool(torch.isfinite(test_feats[chosen]).all()):
            sv = within_class_spectrum(test_feats[chosen], y_test)
            spec, dims = [round(v, 6) for v in sv[:64].tolist()], flat_dims(sv)
        j = chosen if chosen is not None else mine[0]
        sched = schedules[j]
        out.append(
            (
                cfg,
                ResultRow(
                    run_id=cfg.run_id(),
                    teacher_calls=runs[i].calls,
                    new_teacher_calls=runs[i].new_calls,
                    lr_used=trials[j][1],
                    lrs_tried=[trials[q][1] for q in mine],
                    best_val_by_lr=[
                        math.nan if q in diverged else schedules[q].best_val for q in mine
                    ],
                    lrs_diverged=[trials[q][1] for q in mine if q in diverged],
                    best_val_acc=sched.best_val if chosen is not None else math.nan,
                    test_acc=float(test_acc[j]) if chosen is not None else math.nan,
                    best_epoch=sched.best_epoch,
                    epochs=sched.epoch,
                    epoch_cap=cfg.epoch_cap,
                    phases_reached=sched.phase + 1,
                    steps=sched.epoch * steps_per_epoch,
                    total_steps=sum(schedules[q].epoch for q in mine) * steps_per_epoch,
                    n_train=runs[i].y_train.numel(),
                    n_val=runs[i].y_val.numel(),
                    train_images_per_s=images / n_trials / max(train_time, 1e-9),
                    stack_images_per_s=images / max(train_time, 1e-9),
                    stacked_runs=n_trials,
                    wall_s=round(wall, 3),
                    ran_on=str(device),
                    teacher_test_acc=t_meta.get("test_accuracy"),
                    flat_dims=dims,
                    spectrum=spec,
                ),
            )
        )
    return out


def _copy_rows(rows: Sequence[int], src: Tensors, dst: Tensors) -> None:
    """``dst[k][r] = src[k][r]`` for the stack rows ``rows``."""
    if not rows or not dst:
        return
    index = torch.tensor(rows, device=next(iter(dst.values())).device)
    for k in dst:
        dst[k].index_copy_(0, index, src[k].index_select(0, index))
