"""Every sharpness measure on a batch sharded over 8 devices equals its one-device value.

The pytest process has one CPU device, so ``tests/multidevice/measures_8dev.py`` runs in a
subprocess with 8 forced CPU devices and writes, per measure, the largest difference between
the sharded and the one-device result relative to the result's largest magnitude.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_parallel import REPO, SUBPROCESS_TIMEOUT_S, _subprocess_env

# float32, sums over 64 examples reordered across 8 devices: ~1e-7 relative per reduction.
# Products and single reductions stay within a few 1e-7; Lanczos (20 steps), the density
# (Ritz values shift ~1e-6 ‖H‖, the density by that over σ) and the 20-step trace estimators
# accumulate it over their steps; adaptive sharpness is a difference L(w + δ) − L(w) of two
# losses ~1e3 times larger than itself, so its relative error is ~1e3 times larger.
TOLERANCES = {
    "hvp": 1e-6,
    "ggn_product": 1e-6,
    "fisher_product": 1e-6,
    "hessian_diagonal": 1e-6,
    "landscape": 1e-6,
    "trace_hutchinson": 1e-6,
    "trace_hutchpp": 1e-5,
    "trace_ggn": 1e-5,
    "trace_per_layer": 1e-5,
    "top_eigenvalues": 1e-5,
    "top_eigenvalues_fisher": 1e-5,
    "top_eigenvalues_per_layer": 1e-5,
    "spectral_density": 1e-4,
    "minimum_sharpness": 1e-5,
    "adaptive_average": 1e-3,
    "adaptive_worst": 1e-3,
    "inside_jit": 1e-5,
}


@pytest.fixture(scope="module")
def eight(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("measures") / "measures_8dev.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multidevice.measures_8dev", str(out)],
        cwd=REPO,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=2 * SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_the_batch_is_sharded_and_the_program_all_reduces(eight):
    assert eight["devices_holding_the_batch"] == 8
    assert eight["inside_jit_all_reduces"] is True


@pytest.mark.parametrize("measure", sorted(TOLERANCES))
def test_sharded_measure_equals_one_device(eight, measure):
    assert eight[measure] <= TOLERANCES[measure], (measure, eight[measure])
