"""Fixed-value (golden) tests against the original implementations, as optax does.

The values (``golden`` of the loss table in ``helpers.py``) were computed once
with a straightforward float64 NumPy transcription of the original PyTorch
code on the fixed input ``GOLDEN_T``/``GOLDEN_S``:

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
from helpers import GOLDEN, GOLDEN_S, GOLDEN_T, assert_close, to_float, to_tensor


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("label", list(GOLDEN))
def test_golden_values_of_the_original_implementations(label, dtype):
    """Each ``Golden`` value of the loss table (function or class call)."""
    case, golden = GOLDEN[label]
    fn = case.make(**golden.options) if golden.via_class else case.fn
    options = {} if golden.via_class else golden.options
    got = to_float(fn(to_tensor(GOLDEN_T, dtype), to_tensor(GOLDEN_S, dtype), **options))
    assert_close(got, golden.value, dtype, atol=1e-12 if dtype == "float64" else 1e-6)


def test_golden_ckd_by_hand():
    """The table's CKD golden value: the mean over the 20 ordered pairs i != j and 4
    columns of ``(e_i - e_j)^2``, ``e = S - T``, summed in exact binary fractions."""
    e = GOLDEN_S - GOLDEN_T
    pairs = [(e[i] - e[j]) ** 2 for i in range(5) for j in range(5) if i != j]
    assert float(np.mean(pairs)) == 45.75 / 80 == GOLDEN["comparative"][1].value
