"""A stack of trials and the building blocks every training loop shares.

A *stack* is the configs of one :func:`engine.train` call (they agree on
:meth:`RunConfig.stack_key`); every candidate lr of a config is a *trial*. A
:class:`Trial` owns its learner (student + method), momentum, generator,
:class:`protocol.Schedule` and best checkpoint; :class:`Stack` is the trials
plus what they share (data on the device, teacher caches, clock).
:func:`build_stack` makes one; :func:`sgd_step` is the one SGD update (the
teacher's training uses it too).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ckd_torch  # noqa: F401  (selects keras' torch backend before ckd_core imports keras)
import numpy as np
import torch
from torch import nn

from . import methods
from .config import Preset, RunConfig
from .data import ImageDataset, load_dataset
from .devices import autocast, prefers_channels_last, prepare_model, resolve_device
from .models import create_model, feature_shapes
from .protocol import Schedule
from .teacher_cache import query_teacher, split_subset

__all__ = [
    "Learner",
    "RunData",
    "Stack",
    "Teacher",
    "Tensors",
    "Trial",
    "build_stack",
    "sgd_step",
    "to_device",
]

Teacher = tuple[nn.Module, Mapping[str, Any]]
Tensors = dict[str, torch.Tensor]


class Learner(nn.Module):
    """Student + method as one module: ``forward`` is a step's loss, ``predict`` the
    student's ``(logits, penultimate features)`` in float32 (``functional_call``
    over stacked parameters runs either); the student computes at ``precision``
    (:func:`devices.autocast`)."""

    def __init__(
        self,
        student: nn.Module,
        method: methods.Method,
        device: torch.device,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.student = prepare_model(student, device, precision)
        self.method = method
        self.device_type = device
        self.precision = precision

    def _student(self, x: torch.Tensor, with_features: bool):
        with autocast(self.device_type, self.precision):
            if with_features:
                return self.student(x, return_features=True)
            return self.student(x), None

    def forward(self, x, teacher=None, labels=None, batch=None):
        """The step's loss; with ``x`` alone, :meth:`predict`."""
        if teacher is None:
            return self.predict(x)
        loss, _ = self.method.step(self._student, x, teacher, labels, batch)
        return loss

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device_type, self.precision):
            logits, feats = self.student(x, return_features=True)
        return logits.float(), feats[-1].float().flatten(1)


@dataclass
class RunData:
    """One config's data on the device: its subset, validation split and teacher cache."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    teacher: Tensors
    calls: int
    new_calls: int


@dataclass
class Trial:
    """One (config, lr): its learner, optimiser state, draws, schedule and best checkpoint."""

    run: int  # index of its config in the stack
    lr: float
    learner: Learner
    generator: torch.Generator
    schedule: Schedule
    momentum: Tensors = field(default_factory=dict)
    best: Tensors = field(default_factory=dict)
    diverged: bool = False

    def params(self) -> Tensors:
        return {k: v.detach() for k, v in self.learner.named_parameters()}

    def buffers(self) -> Tensors:
        return dict(self.learner.named_buffers())

    def save_best(self) -> None:
        """Checkpoints the parameters and buffers (momentum stays as it is)."""
        self.best = {k: v.clone() for k, v in {**self.params(), **self.buffers()}.items()}

    @torch.no_grad()
    def load_best(self) -> None:
        for k, v in {**self.params(), **self.buffers()}.items():
            v.copy_(self.best[k])


@dataclass
class Stack:
    """The trials of one :func:`engine.train` call and what they share."""

    configs: list[RunConfig]
    dataset: ImageDataset
    device: torch.device
    runs: list[RunData]
    trials: list[Trial]
    teacher_meta: dict[str, Any]
    steps_per_epoch: int
    started: float = field(default_factory=time.perf_counter)
    epoch: int = 0
    step_no: int = 0
    train_time: float = 0.0
    images: int = 0

    @property
    def active(self) -> list[Trial]:
        """Trials still training, in stack order."""
        return [t for t in self.trials if not t.schedule.done]

    @property
    def preset(self) -> Preset:
        return self.configs[0].preset_spec


def to_device(device: torch.device, a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum: Sequence[torch.Tensor],
    lr: torch.Tensor,
    preset: Preset,
) -> None:
    """In place: ``g += wd p; b = m b + g; p -= lr b`` (``torch.optim.SGD`` semantics).

    ``lr`` is a scalar, or ``(R,)`` for parameters stacked over ``R`` trials.
    """
    g = list(grads)
    torch._foreach_add_(g, list(params), alpha=preset.weight_decay)
    torch._foreach_mul_(list(momentum), preset.momentum)
    torch._foreach_add_(list(momentum), g)
    lrs = [
        lr.view(-1, *([1] * (p.dim() - 1))).to(p.dtype) if lr.dim() else lr.to(p.dtype)
        for p in params
    ]
    torch._foreach_sub_(list(params), torch._foreach_mul(list(momentum), lrs))


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


def _feature_shapes(
    cfg: RunConfig, dataset: ImageDataset, teacher: nn.Module | None
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Per-sample feature shapes of student and teacher (white-box methods only)."""
    if not methods.get(cfg.method).whitebox:
        return [], []
    if teacher is None:
        raise ValueError(f"method {cfg.method!r} needs a teacher (--teacher PATH)")
    image_shape = (dataset.in_channels, dataset.crop, dataset.crop)
    probe = create_model(cfg.student_arch, dataset.num_classes, dataset.in_channels)
    return feature_shapes(probe, image_shape), feature_shapes(teacher, image_shape)


def _new_trials(
    i: int, cfg: RunConfig, ctx: methods.MethodContext, stack: Stack, steps: int
) -> list[Trial]:
    """The trials of config ``i``: one per lr, sharing the seed's init and draws."""
    ds, device = stack.dataset, stack.device
    out = []
    for lr in cfg.lrs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the lrs of one seed share their init
            student = create_model(cfg.student_arch, ds.num_classes, ds.in_channels)
            method = methods.build(cfg.method, ctx)
        learner = Learner(student, method, device, cfg.precision).to(device)
        if prefers_channels_last(device, student):
            learner.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack memory_format
        trial = Trial(
            run=i,
            lr=float(lr),
            learner=learner,
            generator=torch.Generator(device=device).manual_seed(7919 * cfg.seed + 17),
            schedule=Schedule.of(cfg.preset_spec, cfg.epoch_cap, cfg.patience, steps),
        )
        trial.momentum = {k: torch.zeros_like(v) for k, v in trial.params().items()}
        trial.save_best()
        out.append(trial)
    return out


def build_stack(
    configs: Sequence[RunConfig], dataset: ImageDataset | None, teacher: Teacher | None
) -> Stack:
    """Validates ``configs`` as one stack and builds its trials, data and teacher caches."""
    configs = [c.validate() for c in configs]
    if len({c.stack_key() for c in configs}) != 1:
        raise ValueError("configs of one stack must agree on everything but seed and lr")
    cfg0 = configs[0]
    device = resolve_device(cfg0.device)
    if dataset is None:
        dataset = load_dataset(cfg0.dataset, cfg0.data_dir)
    t_model, t_meta = _resolve_teacher(cfg0, teacher, device)
    s_shapes, t_shapes = _feature_shapes(cfg0, dataset, t_model)
    stack = Stack(list(configs), dataset, device, [], [], t_meta, steps_per_epoch=0)
    for i, cfg in enumerate(configs):
        train_ids, val_ids = split_subset(len(dataset.x_train), cfg.budget, cfg.seed)
        y_train = to_device(device, dataset.y_train[train_ids]).long()
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
        stack.steps_per_epoch = ctx.steps_per_epoch  # the official epoch; equal across runs
        trials = _new_trials(i, cfg, ctx, stack, ctx.steps_per_epoch)
        cache: Tensors = {}
        calls = new_calls = 0
        if methods.get(cfg.method).uses_teacher:
            feature_ids = trials[-1].learner.method.teacher_features(len(t_shapes))
            got = query_teacher(t_model, t_meta, cfg, dataset, train_ids, feature_ids, device)
            cache, calls, new_calls = got.outputs, got.calls, got.new_calls
        x_val = to_device(device, dataset.x_train[val_ids])
        y_val = to_device(device, dataset.y_train[val_ids]).long()
        x_train = to_device(device, dataset.x_train[train_ids])
        stack.runs.append(RunData(x_train, y_train, x_val, y_val, cache, calls, new_calls))
        stack.trials.extend(trials)
    return stack
