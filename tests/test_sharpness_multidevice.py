"""Every sharpness measure on a batch sharded over 8 devices equals its one-device value.

The pytest process has one CPU device, so ``tests/multidevice/measures_8dev.py`` runs in a
subprocess with 8 forced CPU devices and writes, per measure, the largest difference between
the sharded and the one-device result relative to the result's largest magnitude.
"""

from __future__ import annotations

import pytest

from tests.multidevice.runner import multidevice_fixture

# float32, sums over 64 examples reordered across 8 devices: two orders of one 64-term
# reduction differ by ≲ 64 eps ≈ 8e-6 of its terms' scale (observed ~1e-7). Products and
# single reductions: 1e-5. Lanczos (20 steps) and the 20-30-probe trace estimators carry
# that through their steps: 1e-4; the density (Ritz values shift by that × ‖H‖, the density
# by that over σ = 0.05): 1e-3. Adaptive sharpness is a difference L(w + δ) − L(w) of two
# losses ~1e3 times larger than itself, so its relative error is ~1e3 times larger: 1e-2
# (observed ≤ 5e-5). An unreduced batch (one device's 8 examples) is off by O(1).
TOLERANCES = {
    "hvp": 1e-5,
    "ggn_product": 1e-5,
    "fisher_product": 1e-5,
    "hessian_diagonal": 1e-5,
    "landscape": 1e-5,
    "trace_hutchinson": 1e-4,
    "trace_hutchpp": 1e-4,
    "trace_ggn": 1e-4,
    "trace_per_layer": 1e-4,
    "top_eigenvalues": 1e-4,
    "top_eigenvalues_fisher": 1e-4,
    "top_eigenvalues_per_layer": 1e-4,
    "spectral_density": 1e-3,
    "minimum_sharpness": 1e-4,
    "adaptive_average": 1e-2,
    "adaptive_worst": 1e-2,
    "inside_jit": 1e-4,
}


eight = multidevice_fixture("tests.multidevice.measures_8dev", name="eight")


def test_the_batch_is_sharded_and_the_program_all_reduces(eight):
    assert eight["devices_holding_the_batch"] == 8
    assert eight["inside_jit_all_reduces"] is True


@pytest.mark.parametrize("measure", sorted(TOLERANCES))
def test_sharded_measure_equals_one_device(eight, measure):
    assert eight[measure] <= TOLERANCES[measure], (measure, eight[measure])
