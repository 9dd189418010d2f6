"""Every private (non-public) framework API that ckd-core uses, in one place.

Each has no public equivalent. ``tests/test_private_api.py`` imports each of
them directly, so a framework release that moves one fails loudly there;
at run time the fallbacks below keep the losses working (with a missed
optimisation or a more conservative check).
"""

from __future__ import annotations

from typing import Any


def torch_functorch_wrapped(x: Any) -> bool:
    """Whether a torch tensor is wrapped by a ``torch.func`` transform (vmap, grad).

    Its values are then not concrete: reading them (``.item()``,
    ``.numpy()``) fails under ``vmap``. No public API says so.
    """
    import torch

    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # pragma: no cover - moved: treat every tensor as traced
        return True


def _keras_torch_get_device() -> Any:
    try:
        from keras.src.backend.torch.core import get_device
    except ImportError:  # pragma: no cover - moved: the adapter always enters the scope
        return lambda: ""
    return get_device


_GET_DEVICE: Any = None


def keras_torch_device() -> str:
    """Keras' current torch device (what ``keras.device`` sets), e.g. ``"cpu"``.

    Keras 3 has no public getter; the torch adapter compares it with the
    student's device to skip a ``keras.device`` scope (~10-20 us per call).
    """
    global _GET_DEVICE
    if _GET_DEVICE is None:  # looked up once, on the first call (torch backend only)
        _GET_DEVICE = _keras_torch_get_device()
    return str(_GET_DEVICE())
