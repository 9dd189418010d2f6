"""Chooses the Keras backend before keras is imported; imports nothing heavy itself.

Keras fixes its backend when it is first imported: ``KERAS_BACKEND``, else the
``backend`` of ``~/.keras/keras.json`` (``$KERAS_HOME``), else TensorFlow. Importing
this module, the first thing ``import ckd_core`` does, runs :func:`select_keras_backend`:

* while an adapter (``ckd_torch``, ``ckd_tensorflow``) is being imported, its backend,
  through :func:`use_keras_backend`;
* ``KERAS_BACKEND`` naming a backend whose package is missing: one ``ImportError``;
* nothing chosen (or keras.json's choice not installed) and TensorFlow not installed:
  the first installed of JAX and PyTorch, said once in a warning, else one
  ``ImportError`` naming ``KERAS_BACKEND``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

#: the package each Keras backend needs
BACKEND_PACKAGES = {
    "tensorflow": "tensorflow",
    "jax": "jax",
    "torch": "torch",
    "numpy": "numpy",
    "openvino": "openvino",
}
#: the backend each adapter package needs
ADAPTER_BACKENDS = {"ckd_torch": "torch", "ckd_tensorflow": "tensorflow"}
#: tried in this order when nothing is chosen and TensorFlow is missing
FALLBACKS = ("jax", "torch")


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[package] is None
        return False


def _keras_imported() -> bool:
    return getattr(sys.modules.get("keras"), "config", None) is not None


def _keras_json_backend() -> str | None:
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        return json.loads((home / "keras.json").read_text(encoding="utf-8")).get("backend")
    except (OSError, ValueError, AttributeError):
        return None


def use_keras_backend(backend: str, adapter: str) -> None:
    """Sets ``KERAS_BACKEND=backend`` for ``adapter``; ``ImportError`` if ``KERAS_BACKEND``
    names another backend or keras already runs one (never a silent override).

    Args:
        backend: the Keras backend the adapter needs, e.g. ``"torch"``.
        adapter: the adapter's package name, used in the error message.
    """
    if not _keras_imported():
        chosen = os.environ.get("KERAS_BACKEND")
        if chosen and chosen != backend:
            raise ImportError(
                f"{adapter} needs the Keras '{backend}' backend, but KERAS_BACKEND={chosen}. "
                f"Set KERAS_BACKEND={backend} (or unset it) before starting Python."
            )
        os.environ["KERAS_BACKEND"] = backend
        return
    active = sys.modules["keras"].config.backend()
    if active != backend:
        raise ImportError(
            f"{adapter} needs the Keras '{backend}' backend, but keras was already "
            f"imported with the '{active}' backend. Import {adapter} before keras, or "
            f"set KERAS_BACKEND={backend} in the environment before starting Python."
        )


def select_keras_backend() -> None:
    """Makes sure keras will import with an installed backend (see the module doc)."""
    if _keras_imported():
        return
    for adapter, backend in ADAPTER_BACKENDS.items():
        if adapter in sys.modules:  # ``import ckd_torch`` is importing ckd_core
            use_keras_backend(backend, adapter)
            return
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        package = BACKEND_PACKAGES.get(chosen, chosen)
        if not _installed(package):
            raise ImportError(f"KERAS_BACKEND={chosen}, but {package} is not installed.")
        return
    configured = _keras_json_backend()
    if configured and _installed(BACKEND_PACKAGES.get(configured, configured)):
        return
    if _installed("tensorflow"):
        return
    for backend in FALLBACKS:
        if _installed(backend):
            os.environ["KERAS_BACKEND"] = backend
            warnings.warn(
                f"ckd_core: KERAS_BACKEND is not set and TensorFlow (Keras' default) is not "
                f"installed; using the '{backend}' backend. Set KERAS_BACKEND to choose.",
                stacklevel=2,
            )
            return
    raise ImportError(
        "ckd_core needs a Keras backend: KERAS_BACKEND is not set and none of "
        "tensorflow, jax, torch is installed; install one and set KERAS_BACKEND to it."
    )


select_keras_backend()
