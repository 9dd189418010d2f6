"""The method registry: one :class:`Method` subclass per distillation method.

A method carries its name, label, report order, one-line description, default
loss weights and flags, and the three parts of a training step, split so that
many runs can share one GPU step under ``torch.func.vmap``:

1. :meth:`Method.epoch_order` / :meth:`Method.sample` -- every random choice of
   a step (which cached images, tuples, mixup lambda, CRD negatives), drawn
   from the run's own generator, so a run draws the same numbers alone or in
   a stack;
2. :meth:`Method.step` -- the student's forward pass(es) on the augmented
   images and the loss: a pure function of (parameters, buffers, tensors).

Registering is decorating the class with :func:`register`; a variant of a
registered family (other weights, group size, term, mixin) is one
:func:`register_variant` call. The CLI, grid and report read :func:`names`,
:func:`get` and the class attributes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
from torch import nn

__all__ = [
    "Batch",
    "Method",
    "MethodContext",
    "StudentFn",
    "build",
    "describe",
    "get",
    "names",
    "register",
    "register_variant",
    "wrapped_permutations",
]

Batch = dict[str, torch.Tensor]
#: ``student(x, with_features) -> (logits, features or None)``, under the engine's autocast
StudentFn = Callable[[torch.Tensor, bool], tuple[torch.Tensor, list[torch.Tensor] | None]]


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about its run.

    ``labels``: labels of the cached training subset (class-based sampling);
    ``student_shapes``/``teacher_shapes``: per-sample feature shapes (white-box
    methods); ``seed``: the run's seed (fixed pools and projections).
    """

    num_classes: int
    n_train: int
    batch_size: int
    labels: torch.Tensor
    seed: int
    weights: Mapping[str, float] = field(default_factory=dict)
    student_shapes: Sequence[tuple[int, ...]] = ()
    teacher_shapes: Sequence[tuple[int, ...]] = ()

    @property
    def steps_per_epoch(self) -> int:
        """The official epoch: ``ceil(n_train / batch_size)`` steps, whatever a step holds."""
        return math.ceil(self.n_train / self.batch_size)


class Method(nn.Module):
    """Base class: plain minibatches of ``batch_size`` cached images per step.

    Subclasses set the class attributes and implement :meth:`loss` (or
    override :meth:`step` when the student's forward passes differ).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: position in report tables (baselines first, then ours)
    order: ClassVar[int] = 1000
    #: default loss weights, by term; ``RunConfig.weights`` may override these names only
    weights: ClassVar[Mapping[str, float]] = {}
    uses_teacher: ClassVar[bool] = True
    whitebox: ClassVar[bool] = False
    #: a CKD variant (the paper's method; the report's "ours")
    ours: ClassVar[bool] = False
    #: variants the report's validation-selected row chooses among (e.g. "CKD")
    family: ClassVar[str | None] = None
    #: whether the loss runs under ``torch.func.vmap(grad(...))``
    vmappable: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__()
        unknown = set(ctx.weights) - set(self.weights)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no loss terms {sorted(unknown)}; "
                f"its terms: {sorted(self.weights)}"
            )
        self.ctx = ctx
        self.w = {**self.weights, **ctx.weights}

    # ------------------------------------------------------------------ sampling
    def teacher_features(self, num_features: int) -> tuple[int, ...]:
        """Indices of the teacher's feature list to cache with its logits."""
        return ()

    def epoch_order(self, gen: torch.Generator) -> torch.Tensor:
        """``(steps, k)`` per-step draws for one epoch: here a random permutation
        of the cached images (wrapped), ``batch_size`` per step."""
        return wrapped_permutations(
            gen, self.ctx.n_train, self.ctx.steps_per_epoch, self.ctx.batch_size
        )

    def sample(self, gen: torch.Generator, draw: torch.Tensor) -> Batch:
        """One step's tensors from its row of :meth:`epoch_order`; ``"idx"`` are the
        cached images the student sees (teacher outputs and labels follow them)."""
        return {"idx": draw}

    # ------------------------------------------------------------------ loss
    def step(
        self,
        student: StudentFn,
        x: torch.Tensor,
        teacher: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        batch: Batch,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, terms)`` for augmented images ``x`` of ``batch["idx"]``."""
        logits, feats = student(x, self.whitebox)
        return self.combine(self.loss(logits.float(), feats, teacher, labels, batch))

    def loss(
        self,
        logits: torch.Tensor,
        features: list[torch.Tensor] | None,
        teacher: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        batch: Batch,
    ) -> dict[str, torch.Tensor]:
        """Unweighted loss terms, keyed like :attr:`weights`."""
        raise NotImplementedError

    def combine(
        self, terms: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of ``terms`` (zero-weight terms are not computed by callers
        that check :attr:`w`, but are dropped here either way)."""
        total = sum(self.w[k] * v for k, v in terms.items() if self.w[k] != 0)
        return total, {k: v.detach() for k, v in terms.items()}  # type: ignore[return-value]


def wrapped_permutations(gen: torch.Generator, n: int, steps: int, width: int) -> torch.Tensor:
    """``(steps, width)`` indices: random permutations of ``0..n-1``, concatenated
    (a new one whenever the last runs out), cut into ``steps`` rows -- the epoch
    order of every method that walks the cached images."""
    total = steps * width
    perms = [
        torch.randperm(n, generator=gen, device=gen.device) for _ in range(math.ceil(total / n))
    ]
    return torch.cat(perms)[:total].view(steps, width)


_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: adds a method under its ``name`` (unique)."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    if not cls.description or not cls.label:
        raise ValueError(f"method {cls.name!r} needs a label and a description")
    _REGISTRY[cls.name] = cls
    return cls


def register_variant(
    base: type[Method] | tuple[type[Method], ...],
    name: str,
    label: str,
    description: str,
    order: int,
    **attributes: object,
) -> type[Method]:
    """Registers a subclass of ``base`` (a class, or mixins then a class) under ``name``
    with these class attributes (e.g. ``k``, ``weights``, ``term_cls``)."""
    bases = base if isinstance(base, tuple) else (base,)
    class_name = "".join(p.capitalize() for p in re.split(r"[^0-9A-Za-z]+", name) if p)
    attrs = {"name": name, "label": label, "description": description, "order": order}
    namespace = {**attrs, **attributes, "__module__": bases[-1].__module__}
    namespace["__doc__"] = f"{label}: {description}."
    return register(type(class_name, bases, namespace))


def names() -> list[str]:
    """Registered names in report order."""
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n))


def get(name: str) -> type[Method]:
    """The class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(names())}") from None


def describe() -> dict[str, str]:
    """``{name: one-line description}`` in report order."""
    return {n: _REGISTRY[n].description for n in names()}


def build(name: str, ctx: MethodContext) -> Method:
    """An instance of method ``name`` for the run described by ``ctx``."""
    return get(name)(ctx)
