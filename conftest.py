"""Root pytest configuration: which doctest modules the active backend can import.

``pytest tests src/ckd_core adapters`` (what noxfile.py runs) collects the
doctests of the adapters too, but importing ``ckd_torch`` or
``ckd_tensorflow`` selects a Keras backend, and fails when keras already runs
another one. So each adapter's package is collected only in the session of
its own backend (``KERAS_BACKEND``; keras' default is tensorflow).
"""

from __future__ import annotations

import os

_ADAPTERS = {"torch": "adapters/ckd_torch", "tensorflow": "adapters/ckd_tensorflow"}
_BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")

collect_ignore = [path for backend, path in _ADAPTERS.items() if backend != _BACKEND]
