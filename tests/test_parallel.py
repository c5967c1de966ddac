"""Data-parallel steps (pmap, shard_map), gradient accumulation, BatchNorm, multi-host.

The pytest process has one CPU device, so the multi-device checks run in subprocesses:
``tests/multidevice/checks_8dev.py`` (8 forced CPU devices, all checks in one run, results as
JSON) and two ``tests/multidevice/multihost_worker.py`` processes joined by
``jax.distributed`` (2 CPU devices each). Every check compares against an independent
reference: single-device full-batch training with the plain transformation, ``sharpjax.msam``,
or the update equations written out on the flat vector (tests/multidevice/common.py).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import sharpjax
from sharpjax import parallel
from sharpjax.parallel import TrainState
from tests.multidevice.common import (
    RHO,
    full_batch_reference,
    init_params,
    make_batches,
    mlp_loss,
    per_device_equations,
    sgd,
)
from tests.multidevice.runner import (
    free_port,
    multidevice_fixture,
    run_processes,
    subprocess_env,
)

# float32: the parallel sums are reordered, nothing else differs. A gradient sums ≲ 45
# terms (32 examples, 6 + 8 + 3 units): two orders differ by ≲ 45 eps of its scale (≲ 1);
# 5 heavy-ball steps at lr 0.1 weigh that by lr Σ (1 − μ^k)/(1 − μ) ≈ 1.3, ×3 for the
# dynamics: ≲ 2e-5 (observed ≤ 2.4e-7). The modes that must differ do by ≥ DIFFERENT.
TOL = 2e-5
LR_PLAIN = 0.1
DIFFERENT = 1e-3  # what "gives different parameters" means here

# Every 8-device check runs once, in one subprocess; each test reads its JSON results.
eight = multidevice_fixture("tests.multidevice.checks_8dev", name="eight")


# --------------------------------------------------------------------------------------
# 8 devices.
# --------------------------------------------------------------------------------------


def test_synced_mode_equals_single_device_full_batch_sam(eight):
    # 5 steps, momentum SGD; every device holds the same params after each step.
    assert eight["pmap_synced_vs_full_batch"] < TOL
    # Each replica applies the all-reduced gradient with the same program; XLA does not
    # promise that every participant of an all-reduce gets the same bits, so: rounding-equal.
    assert eight["pmap_replica_spread"] < TOL


def test_per_device_mode_equals_msam_with_one_microbatch_per_device(eight):
    assert eight["pmap_per_device_vs_msam8"] < TOL
    assert eight["pmap_per_device_vs_full_batch"] > DIFFERENT


def test_grouped_mode_interpolates_between_per_device_and_synced(eight):
    assert eight["grouped8_vs_synced"] < TOL
    assert eight["grouped1_vs_per_device"] < TOL
    assert eight["grouped2_vs_synced"] > DIFFERENT
    assert eight["grouped2_vs_per_device"] > DIFFERENT
    # groups of 2 consecutive devices = mSAM with 4 contiguous micro-batches
    assert eight["grouped2_vs_msam4"] < TOL


@pytest.mark.parametrize("name", ["vasso", "saner"])
def test_vasso_and_saner_in_synced_and_per_device_modes(eight, name):
    assert eight[f"{name}_pmap_synced_vs_full_batch"] < TOL
    assert eight[f"{name}_pmap_per_device_vs_equations"] < TOL
    assert eight[f"{name}_per_device_vs_synced"] > DIFFERENT


def test_vasso_state_is_per_device(eight):
    # pmap: each device's copy of d differs; shard_map: d alone gets a device axis.
    assert eight["vasso_pmap_d_spread"] > DIFFERENT
    assert eight["shard_map_vasso_d_spec"] == "P('batch',)"
    assert eight["shard_map_vasso_d_shape"] == [8, 3]
    assert eight["shard_map_vasso_count_spec"] == "P()"
    assert eight["shard_map_momentum_spec"] == "P()"
    assert eight["shard_map_vasso_per_device_vs_equations"] < TOL  # on an Explicit-axes mesh
    assert "Explicit" in eight["explicit_mesh_axis_types"]


def test_shard_map_equals_pmap(eight):
    for mode in ("synced", "per_device", "grouped2"):
        assert eight[f"shard_map_vs_pmap_{mode}"] < TOL, mode


def test_shard_map_per_device_uses_the_local_gradient(eight):
    # Without the cast to device-varying, shard_map would hand the core the psum'd gradient
    # and per-device mode would collapse onto synced mode.
    assert eight["shard_map_per_device_vs_msam8"] < TOL
    assert eight["shard_map_per_device_vs_synced"] > DIFFERENT


def test_gradient_accumulation_on_devices(eight):
    # 8 devices x 2 micro-steps, per-device ε from each device's accumulated gradient.
    assert eight["shard_map_per_device_micro2_vs_msam8"] < TOL


def test_batchnorm_statistics_are_averaged_across_devices(eight):
    # flax BatchNorm(axis_name): the 8-device synced step is full-batch SAM with BatchNorm.
    for path in ("pmap", "shard_map"):
        assert eight[f"bn_axis_{path}_params_vs_full_batch"] < TOL, path
        assert eight[f"bn_axis_{path}_stats_vs_full_batch"] < TOL, path
    # Per-device BatchNorm: the step averages each device's new statistics.
    assert eight["bn_local_pmap_params_vs_reference"] < TOL
    assert eight["bn_local_pmap_stats_vs_mean_of_shards"] < TOL
    assert eight["bn_local_shard_map_stats_vs_mean_of_shards"] < TOL


def test_group_size_must_divide_the_device_count(eight):
    for path in ("pmap", "shard_map"):
        message = eight[f"bad_group_size_{path}"]
        assert "group_size=3 does not divide the 8 devices of axis 'batch'" in message, message


def test_sampa_runs_its_two_gradients_on_the_two_device_groups(eight):
    """SAMPa on a (pair, batch) = (2, 4) mesh equals its sequential form on one device (the
    batch sums reordered over 4 shards, as TOL allows), and each group computes one gradient:
    the same batched program without the split costs one more gradient per device."""
    assert eight["sampa_mesh_shape"] == {"pair": 2, "batch": 4}
    assert eight["sampa_parallel_vs_sequential"] < TOL
    assert "Explicit" in eight["sampa_explicit_mesh_axis_types"]
    assert eight["sampa_parallel_explicit_vs_sequential"] < TOL  # jax.make_mesh's mesh
    assert eight["sampa_parallel_vs_initial"] > DIFFERENT  # it trained
    flops, dots = eight["sampa_flops"], eight["sampa_dots"]
    # Per device (step 0's ∇f(x_0) sits in both programs, under lax.cond): the pair is one
    # batched gradient in both, and split over the groups it costs one gradient's flops less.
    assert dots["gradient"] > 0
    assert dots["parallel"] == dots["vmap"] == 2 * dots["gradient"]
    assert flops["vmap"] - flops["parallel"] > 0.5 * flops["gradient"], flops


# --------------------------------------------------------------------------------------
# Multi-host: 2 processes x 2 CPU devices, jax.distributed over gloo.
# --------------------------------------------------------------------------------------


def test_two_processes_train_like_one_device(tmp_path):
    num_processes, port = 2, free_port()
    worker = [sys.executable, "-m", "tests.multidevice.multihost_worker"]
    commands = [
        [*worker, str(i), str(num_processes), str(port), str(tmp_path / f"process{i}.npz")]
        for i in range(num_processes)
    ]
    run_processes(commands, subprocess_env(), tmp_path / "logs")

    results = [np.load(tmp_path / f"process{i}.npz") for i in range(num_processes)]
    assert int(results[0]["device_count"]) == 4
    batches = make_batches(4, 16)
    params = init_params()
    want = {
        "sam_synced": full_batch_reference(sharpjax.sam(RHO), params, batches),
        "vasso_per_device": per_device_equations(params, batches, 4, "vasso"),
    }
    for name, reference in want.items():
        # Replicated params, but each process runs its own compiled program: XLA promises
        # no bit-identity across processes, so they agree to rounding, like the reference.
        np.testing.assert_allclose(results[0][name], results[1][name], atol=TOL, rtol=0)
        np.testing.assert_allclose(results[0][name], reference, atol=TOL, rtol=0, err_msg=name)
    loss0 = float(mlp_loss(params, batches[0]))
    # A mean of 16 cross-entropies of a 2-layer MLP (≲ 30 accumulated ops): ≲ 30 eps.
    np.testing.assert_allclose(results[0]["sam_synced_loss"][0], loss0, rtol=5e-6)


# --------------------------------------------------------------------------------------
# One device (this process).
# --------------------------------------------------------------------------------------


def test_accumulated_grad_fn_is_the_full_batch_gradient():
    params, batch = init_params(), make_batches(1, 32)[0]
    want = jax.grad(mlp_loss)(params, batch)
    got = parallel.accumulated_grad_fn(parallel.stateless(mlp_loss), None, batch, 4)(params)
    # 32 per-example gradients summed in 4 chunks of 8 instead of at once: the two sums
    # differ by ≲ 32 eps × the per-example gradients' scale (≲ 1), however much they cancel.
    atol = 32 * float(np.finfo(np.float32).eps)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=atol, rtol=1e-6)


def test_gradient_accumulation_equals_full_batch_sam():
    # ε once from the accumulated clean gradient, second pass accumulated at w + ε.
    params, batches = init_params(), make_batches(5, 32)
    tx = optax.chain(sharpjax.sam(RHO), sgd())
    step = jax.jit(parallel.make_train_step(parallel.stateless(mlp_loss), tx, num_micro_steps=4))
    state, got = TrainState(params, None, tx.init(params)), []
    for batch in batches:
        state, _ = step(state, batch)
        got.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)]))
    np.testing.assert_allclose(
        np.stack(got), full_batch_reference(sharpjax.sam(RHO), params, batches), atol=TOL, rtol=0
    )


def _one_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("batch",))


def test_unbound_axis_name_is_a_clear_error():
    params, batch = init_params(), make_batches(1, 8)[0]
    tx = optax.chain(sharpjax.sam(RHO, axis_name="data"), sgd())
    loss_fn = parallel.stateless(mlp_loss)
    step = parallel.make_pmap_train_step(loss_fn, tx, "batch", donate=False)
    state = parallel.replicate(TrainState(params, None, tx.init(params)), "batch")
    with pytest.raises(ValueError, match="axis_name='data' is not bound"):
        step(state, parallel.shard_for_pmap(batch, 1))
    sm_step = parallel.make_shard_map_train_step(loss_fn, tx, _one_device_mesh(), "batch")
    with pytest.raises(ValueError, match="axis_name='data' is not bound"):
        sm_step.init(params)


def test_group_size_that_does_not_divide_is_a_clear_error():
    params, batch = init_params(), make_batches(1, 8)[0]
    tx = optax.chain(
        sharpjax.sam(RHO, axis_name="batch", perturbation_mode="grouped", group_size=2), sgd()
    )
    step = parallel.make_pmap_train_step(parallel.stateless(mlp_loss), tx, "batch")
    state = parallel.replicate(TrainState(params, None, tx.init(params)), "batch")
    with pytest.raises(ValueError, match="group_size=2 does not divide the 1 devices"):
        step(state, parallel.shard_for_pmap(batch, 1))


def test_shard_map_step_rejects_a_transformation_without_the_axis():
    # Without axis_name the final gradient is not averaged, so replicas would diverge.
    tx = optax.chain(sharpjax.sam(RHO), sgd())
    step = parallel.make_shard_map_train_step(
        parallel.stateless(mlp_loss), tx, _one_device_mesh(), "batch"
    )
    with pytest.raises(ValueError, match=r"axis_name='batch'"):
        step.init(init_params())


def test_bad_micro_steps_and_mesh_axis():
    loss_fn, mesh = parallel.stateless(mlp_loss), _one_device_mesh()
    tx = optax.chain(sharpjax.sam(RHO, axis_name="batch"), sgd())
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        parallel.make_shard_map_train_step(loss_fn, tx, mesh, "data")
    with pytest.raises(ValueError, match="num_micro_steps must be an int >= 1"):
        parallel.make_train_step(loss_fn, tx, num_micro_steps=0)
    with pytest.raises(ValueError, match="num_micro_steps=3 does not divide"):
        parallel.split_micro_steps((jnp.zeros((8, 2)),), 3)
    step = parallel.make_shard_map_train_step(loss_fn, tx, mesh, num_micro_steps=3)
    with pytest.raises(ValueError, match="multiple of devices"):
        step(step.init(init_params()), step.shard_batch(make_batches(1, 8)[0]))


def test_sharded_step_on_a_mesh_of_one_equals_full_batch_sam():
    # The GSPMD step (the trainer's) with synced mode is one device's SAM on the global batch.
    params, batches = init_params(), make_batches(5, 32)
    tx = optax.chain(sharpjax.sam(RHO, cosine=True), sgd())
    mesh = parallel.make_mesh(1)
    step = parallel.make_sharded_train_step(parallel.stateless(mlp_loss), tx, mesh)
    state = parallel.replicate_on(mesh, TrainState(params, {}, tx.init(params)))
    got = []
    for batch in batches:
        state, metrics = step(state, parallel.shard_batch(mesh, batch))
        got.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)]))
    np.testing.assert_allclose(
        np.stack(got), full_batch_reference(sharpjax.sam(RHO), params, batches), atol=TOL, rtol=0
    )
    assert np.isfinite(float(metrics["cosine"])) and float(metrics["grad_norm"]) > 0


def test_disturbances_are_the_equations():
    # grad noise: g + σ z with the step's own key; bias: w + b after the update (SGD, no SAM).
    params, batch = init_params(), make_batches(1, 16)[0]
    tx = optax.sgd(LR_PLAIN)
    step = jax.jit(parallel.make_train_step(parallel.stateless(mlp_loss), tx))
    state = TrainState(params, {}, tx.init(params))
    key = jax.random.key(7)
    noisy, _ = step(state, batch, key, parallel.Disturbances(0.1, 0.0, 0.01))
    _, _, k_noise1, _, _ = jax.random.split(key, 5)
    g = parallel.add_normal(jax.grad(mlp_loss)(params, batch), k_noise1, 0.1)
    want = jax.tree.map(lambda w, d: w - LR_PLAIN * d + 0.01, params, g)
    # One step, jitted vs eager: params (≲ 1) rounded once more or less (≲ 1e-7), plus
    # LR · (16-example gradient sums reordered, ≲ 16 eps) ≲ 2e-7; noise or bias is ≥ 1e-3.
    for a, b in zip(jax.tree.leaves(noisy.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    zero, _ = step(state, batch, key, parallel.Disturbances(0.0, 0.0, 0.0))
    plain = jax.tree.map(lambda w, d: w - LR_PLAIN * d, params, jax.grad(mlp_loss)(params, batch))
    for a, b in zip(jax.tree.leaves(zero.params), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)  # as above
    assert step._cache_size() == 1  # both scales ran through one program


def test_bad_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size=30 is not a multiple of the 4 devices"):
        parallel.check_global_batch(30, 4)
    with pytest.raises(ValueError, match="num_microbatches × num_micro_steps = 4 × 3"):
        parallel.check_global_batch(32, 2, num_micro_steps=3, num_microbatches=4)
    with pytest.raises(
        ValueError, match=r"group_size=3 must be a positive divisor .* \[1, 2, 4, 8\]"
    ):
        parallel.perturbation_microbatches("grouped", 8, 3)
    assert parallel.perturbation_microbatches("per_device", 8, None) == 8
    assert parallel.perturbation_microbatches("grouped", 8, 2) == 4


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_split_step_halves_compose_to_the_whole_step(num_microbatches):
    # update(clean(...)) run as two programs == the one-program step: the same keys (gradient
    # noise on both passes, parameter noise), micro-batches and metrics.
    params, batch = init_params(), make_batches(1, 16)[0]
    m = num_microbatches
    sam = sharpjax.msam(RHO, num_microbatches=m) if m > 1 else sharpjax.sam(RHO)
    tx = optax.chain(sam, sgd())
    loss_fn, kwargs = parallel.stateless(mlp_loss), {"num_microbatches": m}
    whole = jax.jit(parallel.make_train_step(loss_fn, tx, **kwargs))
    halves = parallel.make_train_step(loss_fn, tx, split=True, **kwargs)
    state = TrainState(params, {}, tx.init(params))
    key, disturbances = jax.random.key(3), parallel.Disturbances(0.05, 1e-3, 0.0)
    want, want_metrics = whole(state, batch, key, disturbances)
    clean = jax.jit(halves.clean)(state, batch, key, disturbances)
    got, metrics = jax.jit(halves.update)(state, batch, clean, key, disturbances)
    # Two programs instead of one: float32 sums may round differently (≲ 1e-7 relative).
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        np.testing.assert_allclose(metrics[k], want_metrics[k], atol=1e-6, rtol=1e-5, err_msg=k)
    noiseless, _ = jax.jit(halves.update)(
        state, batch, jax.jit(halves.clean)(state, batch), key=None, disturbances=None
    )
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(noiseless), strict=True)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    assert gap > 1e-4  # the noise reached the halves
    with pytest.raises(ValueError, match="With split=True the decision goes to the update half"):
        parallel.make_train_step(loss_fn, tx, split=True, second_gradient=True)
