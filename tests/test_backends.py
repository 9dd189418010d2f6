"""One fixed input set through all four Keras backends, compared pairwise.

Each backend runs in its own subprocess (Keras fixes its backend at import).
Values are compared for every backend (float32 and float64 inputs),
gradients for jax, torch and tensorflow (the numpy backend has none). This
test runs in the numpy session only, so that the four per-backend pytest
runs execute it exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations

import numpy as np
import oracle
import pytest
from helpers import BACKEND, forms

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        BACKEND != "numpy", reason="runs once, in the numpy session (it starts all four backends)"
    ),
]

BACKENDS = ("numpy", "jax", "torch", "tensorflow")

SCRIPT = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
backend = os.environ["KERAS_BACKEND"]
if backend == "jax":
    import jax
    jax.config.update("jax_enable_x64", True)
import keras
import numpy as np
sys.path.insert(0, os.environ["CKD_TESTS_DIR"])
from helpers import call_form, forms

rng = np.random.default_rng(2024)
n, d = 7, 5
teacher = rng.standard_normal((n, d))
student = rng.standard_normal((n, d)) * 2 + 0.5
student[3] = student[1]  # a duplicated row

def losses():
    # every loss and form of the table with the "backends" use
    return {
        name: (lambda t, s, entry=entry: call_form(entry, t, s))
        for name, entry in forms("backends").items()
    }

def compiled(fn):
    # JAX compiles each eager op per shape; one jit per loss is much cheaper.
    return jax.jit(fn) if backend == "jax" else fn

def grad(fn, t, s):
    if backend == "jax":
        return jax.jit(jax.grad(lambda t, x: fn(t, x), argnums=1))(t, s)
    if backend == "tensorflow":
        import tensorflow as tf
        with tf.GradientTape() as tape:
            tape.watch(s)
            value = fn(t, s)
        return tape.gradient(value, s)
    if backend == "torch":
        s = s.detach().clone().requires_grad_(True)
        fn(t, s).backward()
        return s.grad
    return None

out = {"values": {}, "grads": {}}
for dtype in ("float32", "float64"):
    t = keras.ops.convert_to_tensor(teacher.astype(dtype), dtype=dtype)
    s = keras.ops.convert_to_tensor(student.astype(dtype), dtype=dtype)
    for name, fn in losses().items():
        value = keras.ops.convert_to_numpy(compiled(fn)(t, s))
        out["values"][f"{name}/{dtype}"] = float(value)
        if dtype == "float64":
            g = grad(fn, t, s)
            if g is not None:
                out["grads"][name] = np.asarray(keras.ops.convert_to_numpy(g), "float64").tolist()
print("RESULT" + json.dumps(out))
"""


def _run_all() -> dict[str, dict]:
    procs = {}
    for backend in BACKENDS:
        env = {
            **os.environ,
            "KERAS_BACKEND": backend,
            "OMP_NUM_THREADS": "1",
            "CKD_TESTS_DIR": os.path.dirname(os.path.abspath(__file__)),
        }
        procs[backend] = subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for backend, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{backend} failed:\n{stderr[-3000:]}"
        line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")][-1]
        results[backend] = json.loads(line[len("RESULT") :])
    return results


def _tolerance(key: str, backends: tuple[str, ...]) -> float:
    # float64 on the numpy backend is (partly) computed in float32 by Keras.
    if key.endswith("float64") and "numpy" not in backends:
        return 1e-10
    return 1e-5


def test_four_backends_agree_pairwise():
    results = _run_all()
    keys = results["numpy"]["values"].keys()
    assert len(keys) == 2 * len(forms("backends"))  # float32 and float64
    for b1, b2 in combinations(BACKENDS, 2):
        for key in keys:
            v1, v2 = results[b1]["values"][key], results[b2]["values"][key]
            rtol = _tolerance(key, (b1, b2))
            assert abs(v1 - v2) <= rtol * abs(v2) + 1e-12, (key, b1, v1, b2, v2)
    for b1, b2 in combinations(("jax", "torch", "tensorflow"), 2):
        # Every loss has a gradient on both (not: the two key lists, which the
        # same script writes, compared with each other).
        losses = {key.split("/")[0] for key in keys}
        assert set(results[b1]["grads"]) == losses == set(results[b2]["grads"])
        for name, g1 in results[b1]["grads"].items():
            g1, g2 = np.array(g1), np.array(results[b2]["grads"][name])
            assert g1.shape == (7, 5)
            scale = float(np.max(np.abs(g2)))
            assert np.max(np.abs(g1 - g2)) <= 1e-9 * scale + 1e-15, (name, b1, b2)
    assert not results["numpy"]["grads"]

    # And all of them against the oracle (float64 inputs).
    rng = np.random.default_rng(2024)
    teacher = rng.standard_normal((7, 5))
    student = rng.standard_normal((7, 5)) * 2 + 0.5
    student[3] = student[1]
    comparative = oracle.comparative(teacher, student)
    for backend in BACKENDS:
        got = results[backend]["values"]["comparative/float64"]
        assert abs(got - comparative) <= _tolerance("float64", (backend,)) * comparative
        angle = results[backend]["values"]["rkd_angle/float64"]
        want = oracle.rkd_angle(teacher, student)
        assert abs(angle - want) <= _tolerance("float64", (backend,)) * want
