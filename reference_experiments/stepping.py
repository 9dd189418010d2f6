"""How the active trials of a stack take a step and are evaluated.

Two ways, one update (:func:`stack.sgd_step`) and the same numbers per trial:

* :class:`TrialByTrial` -- each trial's learner runs its own forward/backward
  (``autograd.grad``) in turn: the CPU's way (and a lone trial's, and a method
  whose loss functorch cannot transform);
* :class:`Vmapped` -- the trials' parameters are stacked once per epoch and
  ``vmap(grad(functional_call(...)))`` steps them all in one call: CUDA's way.

:func:`runner_for` picks one from :func:`devices.vmaps_stacks` (a measured
rule, see :mod:`.devices`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from . import methods
from .augment import crop_and_flip, preprocess_eval
from .devices import vmaps_stacks
from .models import create_model
from .stack import Learner, Stack, Tensors, Trial, sgd_step

__all__ = ["Draw", "TrialByTrial", "Vmapped", "runner_for"]


@dataclass
class Draw:
    """One trial's step: the method's batch (``"idx"``: cached images) and the crops."""

    batch: Tensors
    crops: torch.Tensor


def _stack(dicts: Sequence[Tensors]) -> Tensors:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


class TrialByTrial:
    """Every trial steps and evaluates on its own module, one after another."""

    def begin_epoch(self, stack: Stack, trials: Sequence[Trial]) -> None:
        """Nothing to gather: each trial's module holds its state."""

    def end_epoch(self, stack: Stack, trials: Sequence[Trial]) -> None:
        """Nothing to scatter back."""

    def step(
        self, stack: Stack, trials: Sequence[Trial], draws: Sequence[Draw], lrs: torch.Tensor
    ) -> torch.Tensor:
        """One SGD step per trial; the losses ``(R,)``."""
        losses = []
        for t, d, lr in zip(trials, draws, lrs, strict=True):
            run, idx = stack.runs[t.run], d.batch["idx"]
            x = crop_and_flip(run.x_train[idx], d.crops, stack.dataset)
            teacher = {k: v[idx] for k, v in run.teacher.items()}
            named = list(t.learner.named_parameters())
            loss = t.learner(x, teacher, run.y_train[idx], d.batch)
            got = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            grads = [
                torch.zeros_like(p) if g is None else g
                for (_, p), g in zip(named, got, strict=True)
            ]
            params = [p.detach() for _, p in named]
            sgd_step(params, grads, [t.momentum[k] for k, _ in named], lr, stack.preset)
            losses.append(loss.detach().float())
        return torch.stack(losses)

    @torch.no_grad()
    def predict(
        self, stack: Stack, trials: Sequence[Trial], images: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per trial, ``(logits, features)`` of its uint8 ``images`` (centre crop)."""
        chunk = stack.configs[0].eval_batch_size
        out = []
        for t, x_u8 in zip(trials, images, strict=True):
            t.learner.eval()
            parts = [
                t.learner.predict(preprocess_eval(x_u8[s : s + chunk], stack.dataset))
                for s in range(0, x_u8.shape[0], chunk)
            ]
            t.learner.train()
            out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
        return out


class Vmapped(TrialByTrial):
    """The trials' parameters stacked per epoch and stepped by one vmapped call."""

    def __init__(self, stack: Stack) -> None:
        cfg, ds = stack.configs[0], stack.dataset
        with torch.device("meta"):  # a template for functional_call (cheaper than a deepcopy)
            self.template = Learner(
                create_model(cfg.student_arch, ds.num_classes, ds.in_channels),
                methods.build(cfg.method, stack.trials[0].learner.method.ctx),
                stack.device,
                cfg.precision,
            )
        self.template.train()
        self.gradient = vmap(grad(self._loss, has_aux=True))
        self.params: Tensors = {}
        self.buffers: Tensors = {}
        self.momentum: Tensors = {}
        self.teacher: Tensors = {}
        self.x_train = self.y_train = torch.empty(0)

    def _loss(self, p, b, x, t, y, batch):
        loss = functional_call(self.template, (p, b), (x, t, y, batch))
        return loss, loss.detach()

    def _predict(self, p, b, x):
        return functional_call(self.template, (p, b), (x,))

    def begin_epoch(self, stack: Stack, trials: Sequence[Trial]) -> None:
        runs = [stack.runs[t.run] for t in trials]
        self.params = _stack([t.params() for t in trials])
        self.buffers = _stack([t.buffers() for t in trials])
        self.momentum = _stack([t.momentum for t in trials])
        self.x_train = torch.stack([r.x_train for r in runs])
        self.y_train = torch.stack([r.y_train for r in runs])
        self.teacher = _stack([r.teacher for r in runs]) if runs[0].teacher else {}

    @torch.no_grad()
    def end_epoch(self, stack: Stack, trials: Sequence[Trial]) -> None:
        for r, t in enumerate(trials):
            for mine, stacked in (
                (t.params(), self.params),
                (t.buffers(), self.buffers),
                (t.momentum, self.momentum),
            ):
                for k, v in mine.items():
                    v.copy_(stacked[k][r])

    def step(
        self, stack: Stack, trials: Sequence[Trial], draws: Sequence[Draw], lrs: torch.Tensor
    ) -> torch.Tensor:
        """One vmapped step for all ``trials``; the losses ``(R,)``."""
        batch = _stack([d.batch for d in draws])
        idx = batch["idx"]  # (R, M)
        rows = torch.arange(len(trials), device=idx.device)[:, None]
        crops = torch.cat([d.crops for d in draws])
        x = crop_and_flip(self.x_train[rows, idx].flatten(0, 1), crops, stack.dataset)
        x = x.unflatten(0, idx.shape)
        teacher = {k: v[rows, idx] for k, v in self.teacher.items()}
        labels = self.y_train[rows, idx]
        grads, loss = self.gradient(self.params, self.buffers, x, teacher, labels, batch)
        keys = list(self.params)
        sgd_step(
            [self.params[k] for k in keys],
            [grads[k] for k in keys],
            [self.momentum[k] for k in keys],
            lrs,
            stack.preset,
        )
        return loss.detach().float()

    @torch.no_grad()
    def predict(
        self, stack: Stack, trials: Sequence[Trial], images: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per trial, ``(logits, features)`` of its ``images``, all trials in one call."""
        p = _stack([t.params() for t in trials])
        b = _stack([t.buffers() for t in trials])
        self.template.eval()
        shared = all(x is images[0] for x in images)  # one image set for all (the test split)
        x_u8 = images[0] if shared else torch.stack(list(images))
        n = x_u8.shape[0 if shared else 1]
        chunk = max(1, stack.configs[0].eval_batch_size // (1 if shared else len(trials)))
        logits, feats = [], []
        for s in range(0, n, chunk):
            if shared:
                xb = preprocess_eval(x_u8[s : s + chunk], stack.dataset)
                out = vmap(self._predict, in_dims=(0, 0, None))(p, b, xb)
            else:
                xs = x_u8[:, s : s + chunk]
                xb = preprocess_eval(xs.flatten(0, 1), stack.dataset).unflatten(0, xs.shape[:2])
                out = vmap(self._predict)(p, b, xb)
            logits.append(out[0])
            feats.append(out[1])
        self.template.train()
        return list(zip(torch.cat(logits, 1).unbind(), torch.cat(feats, 1).unbind(), strict=True))


def runner_for(stack: Stack, trials: Sequence[Trial], cache: dict[str, TrialByTrial]):
    """The runner for ``trials`` of ``stack``: vmapped where the device's measured rule
    says so, the method allows it and more than one trial is active."""
    vmapped = (
        vmaps_stacks(stack.device)
        and methods.get(stack.configs[0].method).vmappable
        and len(trials) > 1
    )
    key = "vmap" if vmapped else "trials"
    if key not in cache:
        cache[key] = Vmapped(stack) if vmapped else TrialByTrial()
    return cache[key]
