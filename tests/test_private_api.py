"""The private framework APIs that ckd-core uses exist where it expects them.

``ckd_core._private_api`` isolates each private import with a fallback, so a
framework release that moves one would only cost an optimisation at run
time; these tests make such a move fail loudly instead.
"""

from __future__ import annotations

import keras
import pytest
from helpers import BACKEND

from ckd_core import _private_api

SRC_DIRS = ("src/ckd_core", "adapters")


def test_no_keras_src_import_outside_the_private_api_module():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for folder in SRC_DIRS:
        for path in (root / folder).rglob("*.py"):
            if path.name == "_private_api.py":
                continue
            text = path.read_text(encoding="utf-8")
            if "keras.src" in text or "torch._C" in text:
                offenders.append(str(path.relative_to(root)))
    assert not offenders, f"private API used outside ckd_core/_private_api.py: {offenders}"


@pytest.mark.skipif(BACKEND != "torch", reason="the torch backend's private hooks")
def test_torch_private_hooks_exist():
    import torch
    from keras.src.backend.torch.core import get_device  # noqa: F401 - must exist

    assert callable(torch._C._functorch.is_functorch_wrapped_tensor)
    assert _private_api.keras_torch_device() == str(get_device())
    with keras.device("cpu"):
        assert _private_api.keras_torch_device() == "cpu"
    x = torch.ones(3)
    assert not _private_api.torch_functorch_wrapped(x)
    seen = []
    torch.func.vmap(lambda v: seen.append(_private_api.torch_functorch_wrapped(v)) or v)(x)
    assert seen == [True]
