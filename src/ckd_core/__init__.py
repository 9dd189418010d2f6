"""ckd-core: comparative knowledge distillation losses for Keras 3.

``from ckd_core import ComparativeLoss`` works on every Keras backend
(JAX, TensorFlow, PyTorch, NumPy); the maths lives in
:mod:`ckd_core.functional`.
"""

import ckd_core._backend_select  # noqa: F401  (first: picks the Keras backend before keras loads)
from ckd_core import functional
from ckd_core.budget import TeacherBudget, TeacherBudgetExceeded
from ckd_core.losses import ComparativeLoss, DISTLoss, KDLoss, ProjectedRKDLoss, RKDLoss

__version__ = "0.1.0"

__all__ = [
    "ComparativeLoss",
    "DISTLoss",
    "KDLoss",
    "ProjectedRKDLoss",
    "RKDLoss",
    "TeacherBudget",
    "TeacherBudgetExceeded",
    "functional",
]
