"""Selects the Keras backend that an adapter package needs.

Keras fixes its backend when it is first imported (``KERAS_BACKEND``), so an
adapter must run this before anything imports keras.
"""

from __future__ import annotations

import os
import sys


def use_keras_backend(backend: str, adapter: str) -> None:
    """Sets ``KERAS_BACKEND=backend`` or raises ``ImportError`` if keras already runs another.

    Args:
        backend: the Keras backend the adapter needs, e.g. ``"torch"``.
        adapter: the adapter's package name, used in the error message.
    """
    keras = sys.modules.get("keras")
    config = getattr(keras, "config", None)
    if config is None:  # keras not imported (yet): its backend is still to be chosen
        os.environ["KERAS_BACKEND"] = backend
        return
    active = config.backend()
    if active != backend:
        raise ImportError(
            f"{adapter} needs the Keras '{backend}' backend, but keras was already "
            f"imported with the '{active}' backend. Import {adapter} before keras, or "
            f"set KERAS_BACKEND={backend} in the environment before starting Python."
        )
