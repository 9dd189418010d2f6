"""Fixed-value (golden) tests against the original implementations, as optax does.

The numbers below were computed once with a straightforward float64 NumPy
transcription of the original PyTorch code on the fixed input ``T``/``S``:

* RKD: RepDistiller ``distiller_zoo/RKD.py`` (``RKDLoss.pdist`` with
  ``clamp(min=1e-12).sqrt()`` and a zeroed diagonal, distances divided by
  the mean of the positive ones, ``F.normalize`` difference vectors,
  ``F.smooth_l1_loss`` means, weights 25 and 50);
* KD: RepDistiller ``distiller_zoo/KD.py`` (``DistillKL``:
  ``F.kl_div(log_softmax(y_s/T), softmax(y_t/T), size_average=False) * T**2
  / batch``);
* DIST: the authors' ``DIST`` (hunto/DIST_KD, ``losses/dist_kd.py``:
  Pearson correlation as the cosine of row-centred vectors with ``+ 1e-8``
  in the denominator, ``inter = 1 - mean(rows)``, ``intra`` on the
  transposes, ``beta * tau**2 * inter + gamma * tau**2 * intra``).

The transcription is not part of the suite (it would be a second oracle);
only its outputs are, so a change of the losses' meaning fails here even if
``tests/oracle.py`` changed with it.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, to_float, to_tensor

import ckd_core
from ckd_core import functional as F

T = np.array(
    [
        [0.5, -1.0, 2.0, 0.25],
        [1.5, 0.0, -0.5, 1.0],
        [-2.0, 0.75, 1.0, -1.25],
        [0.0, 2.5, -1.5, 0.5],
        [1.0, -0.25, 0.0, 3.0],
    ]
)
S = np.array(
    [
        [1.0, -0.5, 1.5, 0.0],
        [0.5, 0.25, -1.0, 1.5],
        [-1.5, 1.0, 0.5, -0.75],
        [0.25, 2.0, -2.0, 1.0],
        [2.0, 0.0, 0.5, 2.5],
    ]
)

RKD_DISTANCE = 0.004409100218433853
RKD_ANGLE = 0.005979068643769899
RKD_25_50 = 0.40918093764934127
KD_T4 = 0.13488528399440697
KD_T1 = 0.12937098004716302
DIST_TAU4 = 4.135779212213627
DIST_B2_G05_TAU1 = 0.5153316592545263

GOLDEN = {
    "rkd_distance": (lambda t, s: F.rkd_distance_loss(t, s), RKD_DISTANCE),
    "rkd_angle": (lambda t, s: F.rkd_angle_loss(t, s), RKD_ANGLE),
    "RKDLoss": (lambda t, s: ckd_core.RKDLoss()(t, s), RKD_25_50),
    "kd_T4": (lambda t, s: F.kd_loss(t, s, temperature=4.0), KD_T4),
    "KDLoss_T1": (lambda t, s: ckd_core.KDLoss(temperature=1.0)(t, s), KD_T1),
    "dist_tau4": (lambda t, s: F.dist_loss(t, s, tau=4.0), DIST_TAU4),
    "DISTLoss": (
        lambda t, s: ckd_core.DISTLoss(beta=2.0, gamma=0.5, tau=1.0)(t, s),
        DIST_B2_G05_TAU1,
    ),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_values_of_the_original_implementations(name, dtype):
    fn, want = GOLDEN[name]
    got = to_float(fn(to_tensor(T, dtype), to_tensor(S, dtype)))
    assert_close(got, want, dtype, atol=1e-12 if dtype == "float64" else 1e-6)


def test_golden_ckd_by_hand():
    # e = S - T; mean over the 20 ordered pairs i != j and 4 columns of
    # ((e_i - e_j))^2, summed in exact binary fractions: 45.75 / 80.
    e = S - T
    pairs = [(e[i] - e[j]) ** 2 for i in range(5) for j in range(5) if i != j]
    assert float(np.mean(pairs)) == 45.75 / 80
    got = to_float(F.comparative_loss(to_tensor(T), to_tensor(S)))
    assert_close(got, 45.75 / 80, "float64")
