"""The efficient variants decide identically on 8 forced CPU devices (run in a subprocess).

``tests/multidevice/efficient_8dev.py`` trains RST, AE-SAM and LookSAM with ``pmap`` over 8
devices whose shards differ (their own ‖g_d‖² differ by a factor > 1.2), in synced and
per-device modes; this module asserts on its JSON results.
"""

from __future__ import annotations

import pytest

from tests.multidevice.runner import multidevice_fixture

VARIANTS = ("rst", "ae_sam", "looksam")
# float32 trajectories whose sums are split over devices: reordering only (~1e-7 per op).
TOL = 2e-6


eight = multidevice_fixture("tests.multidevice.efficient_8dev", name="eight")


def test_devices_see_different_gradients(eight):
    """Otherwise the checks below could not tell a local decision from a shared one."""
    assert eight["local_sq_norm_ratio"] > 1.2


@pytest.mark.parametrize("name", VARIANTS)
def test_synced_mode_decides_as_one_device_on_the_whole_batch(eight, name):
    assert eight[f"{name}_synced_vs_full_batch"] < TOL


@pytest.mark.parametrize("name", VARIANTS)
def test_every_device_takes_the_same_decision(eight, name):
    for mode in ("per_device", "synced"):
        decisions = eight[f"{name}_{mode}_decisions"]
        # The core averages the 0/1 decision over devices: any disagreement shows as a fraction.
        assert set(decisions) <= {0.0, 1.0}, (mode, decisions)
        assert 0 < sum(decisions) < len(decisions), "both kinds of step must occur"
    # Policy state, count of second gradients and params: the same on every device (XLA does
    # not promise every device of an all-reduce the same bits: float32 rounding at most).
    assert eight[f"{name}_replica_spread"] < TOL
