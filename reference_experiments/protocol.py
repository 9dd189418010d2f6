"""The training protocol, written once: lr phases on validation plateaus, the
cosine alternative, and selection on validation.

Official protocol (``alextxu/ckd`` ``train_student.py``, ``helper/loops.py``):
evaluate on the validation split once per epoch (``ceil(n_train / 64)`` steps);
an improvement is a strictly higher accuracy than the best so far (over all
phases); after ``patience`` evaluations without one, reload the best checkpoint
and continue at ``lr x lr_decay`` -- keeping the optimizer (its momentum) --
until the third plateau; at most ``max_epochs`` evaluations in all. The
reported model is the best-validation checkpoint.

>>> p = Schedule(patience=2, phases=2, max_epochs=100)
>>> [p.update(v).name for v in (0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7)]
['IMPROVED', 'IMPROVED', 'WAIT', 'NEXT_PHASE', 'IMPROVED', 'WAIT', 'DONE']
>>> p.best_epoch, p.phase, p.lr_factor(0.1)
(5, 1, 0.1)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .config import Preset

__all__ = ["Event", "Schedule", "best_on_validation"]

T = TypeVar("T")


class Event(enum.Enum):
    IMPROVED = "improved"
    WAIT = "wait"
    NEXT_PHASE = "next_phase"  # reload the best checkpoint, lr x decay
    DONE = "done"


@dataclass
class Schedule:
    """One run's position in the protocol; :meth:`update` after each evaluation.

    ``patience=None``: no plateaus (a fixed schedule of ``max_epochs``).
    """

    patience: int | None
    phases: int
    max_epochs: int
    lr_decay: float = 0.1
    cosine_steps: int = 0  # > 0: lr follows a cosine over this many steps
    best_val: float = -math.inf
    best_epoch: int = 0
    epoch: int = 0
    phase: int = 0
    since_best: int = 0
    done: bool = False

    @classmethod
    def of(cls, preset: Preset, max_epochs: int, patience: int | None, steps: int) -> Schedule:
        if preset.schedule == "cosine":
            return cls(None, 1, max_epochs, preset.lr_decay, cosine_steps=max_epochs * steps)
        return cls(
            preset.patience if patience is None else patience,
            preset.phases,
            max_epochs,
            preset.lr_decay,
        )

    def update(self, val: float) -> Event:
        """Records one epoch's validation accuracy; says what happens next."""
        self.epoch += 1
        if val > self.best_val:
            self.best_val, self.best_epoch, self.since_best = val, self.epoch, 0
            event = Event.IMPROVED
        else:
            self.since_best += 1
            event = Event.WAIT
        if self.patience is not None and self.since_best >= self.patience:
            if self.phase + 1 >= self.phases:
                event = Event.DONE
            else:
                self.phase += 1
                self.since_best = 0
                event = Event.NEXT_PHASE
        if self.epoch >= self.max_epochs:
            event = Event.DONE
        self.done = event is Event.DONE
        return event

    def lr_factor(self, step: int = 0) -> float:
        """lr multiplier: ``lr_decay ** phase``, times the cosine at global ``step``."""
        factor = self.lr_decay**self.phase
        if self.cosine_steps:
            progress = min(step, self.cosine_steps) / self.cosine_steps
            factor *= 0.5 * (1 + math.cos(math.pi * progress))
        return factor


def best_on_validation(candidates: Sequence[T], val: Callable[[T], float | None]) -> T | None:
    """The candidate with the highest finite validation accuracy (the first on ties);
    ``None`` if none is finite. The one selection rule of the package: lr sweeps,
    lr grid axes and the report's validation-selected CKD row all use it."""
    best, best_val = None, -math.inf
    for c in candidates:
        v = val(c)
        if v is not None and math.isfinite(v) and v > best_val:
            best, best_val = c, v
    return best
