"""pytest configuration: ``tests/`` on ``sys.path``, hypothesis profiles, markers.

Test modules import their helpers from ``tests/helpers.py`` (``from helpers
import ...``) and the float64 oracles from ``tests/oracle.py``.

Hypothesis profiles: ``ci`` (100 examples per property, no deadline) is loaded
when the environment variable ``CI`` is set, ``dev`` (20 examples) otherwise.

Markers: ``slow`` marks tests that start interpreters or process groups
(deselect with ``-m "not slow"``).

Warnings are errors, except the named third-party ones in
:data:`THIRD_PARTY_WARNINGS` (raised inside Keras, TensorFlow or JAX, not
by ckd-core or its tests).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("KERAS_BACKEND") == "jax":
    import jax

    # Before keras creates any array: float64 tests need real float64 on JAX.
    jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

THIRD_PARTY_WARNINGS = (
    # Keras' torch backend converts tensors with np.array(x), which NumPy 2
    # warns about for torch's __array__ signature.
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    # torch.compile (Dynamo) internals, warned while tracing any function.
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    "ignore:`torch._prims_common.check` is deprecated:FutureWarning",
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning",
    # NumPy (the numpy backend) on the non-finite inputs that tests pass on
    # purpose: the loss is then NaN or inf, which the tests check.
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    # TensorFlow and JAX import-time deprecations of their own dependencies.
    "ignore::DeprecationWarning:tensorflow.*",
    "ignore::DeprecationWarning:jax.*",
    "ignore::DeprecationWarning:google.protobuf.*",
)


def pytest_configure(config: pytest.Config) -> None:
    """Every warning fails its test, except :data:`THIRD_PARTY_WARNINGS`."""
    config.addinivalue_line("filterwarnings", "error")
    for line in THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
