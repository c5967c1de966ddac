"""The trainer on several devices and several processes (subprocesses with forced CPU devices).

``tests/multidevice/trainer_8dev.py`` runs the trainer on 8 forced CPU devices and on 1, and
reports differences; ``experiments/train_multihost.py`` runs it as 2 processes × 4 devices
(``jax.distributed`` on localhost, gloo) and as 1 process × 8 devices, params split over all 8
(``fsdp`` spanning the processes). The references are the
trainer on one device (synced mode computes the same program on the global batch, so only
float32 summation order differs), mSAM with m = devices on one device (per-device mode), and
the uninterrupted run (resume).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.multidevice.runner import free_port, multidevice_fixture, run_processes, subprocess_env

# float32: the 8-device program sums the batch in another order (≈1e-7 relative per sum); over
# 6 SGD steps with momentum at lr 0.05 on params of size ≤ 1 that stays far below this.
TOL = 2e-5
DIFFERENT = 1e-3
# bf16 SAM vs float32 SAM on digits, mean test accuracy over 3 seeds (450 test examples).
BF16_MARGIN = 0.02


eight = multidevice_fixture("tests.multidevice.trainer_8dev", name="eight")


@pytest.mark.parametrize("name", ["bn", "augment", "accumulation"])
def test_synced_on_8_devices_equals_1_device(eight, name):
    for what in ("params", "batch_stats", "train_loss", "test_loss", "grad_norm"):
        assert eight[f"{name}_{what}"] < TOL, (name, what, eight[f"{name}_{what}"])


def test_the_8_device_comparisons_can_fail(eight):
    # The BatchNorm statistics moved away from their init, and accumulation with BatchNorm
    # (per-micro-step statistics) is a different run from the plain one.
    assert eight["bn_stats_moved"] > DIFFERENT
    assert eight["accumulation_vs_plain"] > DIFFERENT
    assert eight["augment_vs_plain"] > DIFFERENT  # the crops and flips changed the run


def test_per_device_mode_equals_msam_with_one_microbatch_per_device(eight):
    for what in ("params", "train_loss", "grad_norm"):
        assert eight[f"per_device_vs_msam8_{what}"] < TOL, what
        assert eight[f"grouped2_vs_msam4_{what}"] < TOL, what
    assert eight["per_device_vs_synced"] > DIFFERENT


def test_resume_after_a_stop_is_bit_identical_on_8_devices(eight):
    assert eight["resume_params"] == 0.0
    assert eight["resume_batch_stats"] == 0.0
    assert eight["resume_history_equal"]


def test_mixed_precision_on_8_devices(eight):
    assert eight["bf16_finite"] and eight["f32_finite"]
    for first, last in eight["bf16_train_loss_first_last"]:
        assert last < 0.5 * first
    bf16, f32 = np.mean(eight["bf16_test_accuracy"]), np.mean(eight["f32_test_accuracy"])
    assert f32 > 0.85  # chance is 0.10
    assert abs(bf16 - f32) < BF16_MARGIN, (eight["bf16_test_accuracy"], eight["f32_test_accuracy"])


def test_bad_device_input_is_a_clear_error(eight):
    assert "batch_size=60 is not a multiple of the 8 devices" in eight["bad_batch_for_devices"]
    assert "num_devices=16 must be an int in [1, 8]" in eight["bad_num_devices"]
    assert "group_size=3 must be a positive divisor of the 8 devices" in eight["bad_group_size"]


def _run_multihost(
    tmp_path, num_processes: int, devices_per_process: int, mesh: str | None = None
) -> list[dict]:
    port = free_port()
    overrides = [
        "--dataset=digits",
        "--model=mlp",
        '--model_kwargs={"hidden_sizes": [16]}',
        "--optimizer=sam",
        "--epochs=1",
        "--batch_size=64",
        "--max_steps_per_epoch=3",
        "--learning_rate=0.05",
        "--progress=false",
        *([f"--mesh={mesh}"] if mesh else []),
    ]
    out = str(tmp_path / f"p{num_processes}_{{process_id}}.npz")
    commands = [
        [
            sys.executable,
            "experiments/train_multihost.py",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(num_processes),
            "--process-id",
            str(i),
            "--cpu-collectives",
            "gloo",
            "--out",
            out,
            "--",
            *overrides,
        ]
        for i in range(num_processes)
    ]
    env = subprocess_env(cpu_devices=devices_per_process)
    run_processes(commands, env, tmp_path / f"logs{num_processes}")
    return [dict(np.load(out.format(process_id=i))) for i in range(num_processes)]


# fsdp=8 on 2 processes × 4 devices: every fsdp group holds devices of both processes, so
# each parameter is split across the hosts (the trainer's mesh is data-major, so data=2,fsdp=4
# would keep each fsdp group on one host) and the batch is split over both.
def test_trainer_on_2_processes_equals_1_process_with_as_many_devices(tmp_path):
    mesh = "fsdp=8"
    two = _run_multihost(tmp_path, 2, 4, mesh)
    one = _run_multihost(tmp_path, 1, 8, mesh)
    assert int(two[0]["device_count"]) == 8 and int(one[0]["device_count"]) == 8
    for run in two:
        axes, processes = list(run["mesh_axes"]), run["mesh_processes"]
        fsdp = axes.index("fsdp")
        groups = np.moveaxis(processes, fsdp, -1).reshape(-1, processes.shape[fsdp])
        assert all(set(g) == {0, 1} for g in groups), processes  # fsdp spans both processes
        # Each process holds only its own shards: about half the elements (a leaf that fsdp=8
        # does not divide, the last bias, is whole on both).
        total = two[0]["params"].size
        assert total / 2 <= int(run["held_elements"]) < total, (run["held_elements"], total)
    assert int(one[0]["held_elements"]) == one[0]["params"].size
    # Gathered whole on both processes, but each runs its own compiled program (XLA promises
    # no bit-identity across processes) and the 1-process run sums in another order: rounding.
    for key in ("params", "train_loss"):
        np.testing.assert_allclose(two[0][key], two[1][key], atol=TOL, rtol=0, err_msg=key)
        np.testing.assert_allclose(two[0][key], one[0][key], atol=TOL, rtol=0, err_msg=key)
    # Accuracy is an argmax count: logits that agree to rounding may still flip an example
    # whose top-2 margin is within it. Allow 2 flips of the 450 test examples (the params
    # agree to TOL, so a flip needs a margin ≲ 1e-4); a wrong run differs by many more.
    flips = 2 / 450 + 1e-9
    for other in (two[1], one[0]):
        acc, ref = two[0]["test_accuracy"], other["test_accuracy"]
        np.testing.assert_array_equal(np.isnan(acc), np.isnan(ref))  # evaluated epochs
        np.testing.assert_allclose(acc, ref, atol=flips, rtol=0)
