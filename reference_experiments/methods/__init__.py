"""Distillation methods, one class each, in a registry (see :mod:`.registry`).

Importing this package registers every family: :mod:`.logits` (ce, kd, rkd,
rkd_d*, dist), :mod:`.mixing` (mixup, mixup3), :mod:`.contrastive` (crd),
:mod:`.comparative` (the CKD variants) and :mod:`.whitebox` (fitnets, vid, cc
and their +crd / +ckd forms).
"""

from . import comparative, contrastive, logits, mixing, registry, whitebox
from .registry import Batch, Method, MethodContext, StudentFn, build, describe, get, names

__all__ = [
    "Batch",
    "Method",
    "MethodContext",
    "StudentFn",
    "build",
    "comparative",
    "contrastive",
    "describe",
    "get",
    "logits",
    "mixing",
    "names",
    "registry",
    "whitebox",
]
