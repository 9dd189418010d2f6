"""PyTorch adapter: ckd-core losses as ``torch.nn.Module``.

Importing this package selects Keras' torch backend (or raises
``ImportError`` when keras already runs another backend). Modules follow
torch's ``forward(input, target)`` order: ``forward(student, teacher)``.

Example:
    >>> import torch
    >>> from ckd_torch import ComparativeLoss
    >>> student = torch.randn(8, 10, requires_grad=True)
    >>> teacher = torch.randn(8, 10)
    >>> ComparativeLoss()(student, teacher).backward()
"""

from ckd_core._backend_select import use_keras_backend

use_keras_backend("torch", "ckd_torch")

from ckd_torch.budget import TorchTeacherBudget  # noqa: E402
from ckd_torch.losses import (  # noqa: E402
    ComparativeLoss,
    DISTLoss,
    KDLoss,
    ProjectedRKDLoss,
    RKDLoss,
)

__all__ = [
    "ComparativeLoss",
    "DISTLoss",
    "KDLoss",
    "ProjectedRKDLoss",
    "RKDLoss",
    "TorchTeacherBudget",
]
