"""Every sharpness measure on a batch sharded over 8 devices, and on params split 8 ways,
equals its one-device value; parameter-sized results keep the params' sharding, and the memory
per device falls with the shard count.

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
    # Params split 8 ways (kernels along their output axis, else their input axis): sums over
    # a split axis become per-device partial sums plus an all-reduce, the same reordering.
    "sharded_params/hvp": 1e-5,
    "sharded_params/landscape": 1e-5,
    "sharded_params/top5": 1e-4,
    "sharded_params/hutchpp": 1e-4,
    "sharded_params/hutchinson": 1e-4,
    "sharded_params/density": 1e-3,
    "sharded_params/adaptive_average": 1e-2,
    "sharded_params/adaptive_worst": 1e-2,
}


eight = multidevice_fixture("tests.multidevice.measures_8dev", name="eight")


def test_the_batch_is_sharded_and_the_program_all_reduces(eight):
    assert eight["devices_holding_the_batch"] == 8
    assert eight["inside_jit_all_reduces"] is True


@pytest.mark.parametrize("measure", sorted(TOLERANCES))
def test_sharded_measure_equals_one_device(eight, measure):
    assert eight[measure] <= TOLERANCES[measure], (measure, eight[measure])


def test_params_are_split_and_results_keep_their_layout(eight):
    # hidden kernel and bias along the output axis, out kernel along its input axis; the
    # 3-entry out bias does not divide and stays whole.
    assert sorted(eight["params_split_8_ways"]) == [1, 8, 8, 8]
    # Eigenvectors and landscape directions (stacks) and hvp and the worst-case delta
    # (vectors) come back sharded as the params, each device holding its own part only.
    assert eight["sharded_params/layout"] == dict.fromkeys(
        ("eigenvectors", "hvp", "landscape_directions", "adaptive_delta"), True
    )


def test_sharded_ritz_vectors_equal_the_one_device_ones(eight):
    # |⟨u, u'⟩| = 1 − ‖u − u'‖²/2 for unit vectors of the same sign: 1e-3 allows a relative
    # difference of ~4e-2 per vector, Lanczos rounding (≲1e-5) amplified by ‖H‖ over the gap
    # to the next Ritz value of this 83-parameter net.
    assert all(abs(1 - o) < 1e-3 for o in eight["sharded_params/eigenvector_overlap"])


@pytest.mark.parametrize("program", ["lanczos", "hutchpp"])
def test_memory_per_device_falls_with_the_shard_count(eight, program):
    # XLA's memory_analysis of the compiled program is deterministic. On an MLP of ~440k
    # parameters the 20-vector Krylov basis (or the 30 probes) dominates; kept in the params'
    # layout it is split with them, so 8 shards need at most a quarter of one device's memory
    # (ideal: an eighth, plus the replicated data and small per-device buffers).
    used = {
        n: eight[f"memory/{program}/{n}"]["arguments"]
        + eight[f"memory/{program}/{n}"]["temporaries"]
        for n in (1, 2, 4, 8)
    }
    assert used[1] > used[2] > used[4] > used[8], used
    assert used[8] <= 0.25 * used[1], used
