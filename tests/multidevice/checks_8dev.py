"""The 8-device checks, run in a subprocess with 8 forced CPU devices.

Usage: ``python -m tests.multidevice.checks_8dev OUT.json``. Writes ``{check: value}``: max
absolute differences between trajectories of flat params (and a few flags and error messages);
tests/test_parallel.py asserts on them.
"""

from __future__ import annotations

import os

from tests.multidevice.runner import cpu_device_flags

os.environ["XLA_FLAGS"] = cpu_device_flags(8)  # before jax is imported

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sharpjax
from sharpjax import parallel
from sharpjax.parallel import TrainState
from tests.multidevice.common import (
    LR,
    RHO,
    diff,
    flat,
    full_batch_reference,
    init_params,
    make_batches,
    mlp_loss,
    msam_reference,
    per_device_equations,
    sgd,
)

N, STEPS, BATCH = 8, 5, 32
AXIS = "batch"


def host_first(tree):
    """The first device's copy of a pmapped pytree, indexed on the host."""
    return jax.tree.map(lambda x: np.asarray(x)[0], tree)


def run_pmap(sharp_tx, params, batches, *, loss_fn=None, model_state=None, micro=1):
    """Flat params after each step, the final replicated state, and the spread across devices."""
    loss_fn = loss_fn or parallel.stateless(mlp_loss)
    tx = optax.chain(sharp_tx, sgd())
    step = parallel.make_pmap_train_step(loss_fn, tx, AXIS, num_micro_steps=micro)
    state = parallel.replicate(TrainState(params, model_state, tx.init(params)), AXIS)
    trajectory, spread = [], 0.0
    for batch in batches:
        state, _ = step(state, parallel.shard_for_pmap(batch, N))
        host = jax.tree.map(np.asarray, state.params)
        stacked = np.stack([flat(jax.tree.map(lambda x, i=i: x[i], host)) for i in range(N)])
        spread = max(spread, diff(stacked, stacked[:1]))
        trajectory.append(stacked[0])
    return np.stack(trajectory), state, spread


def run_shard_map(sharp_tx, params, batches, mesh, *, loss_fn=None, model_state=None, micro=1):
    loss_fn = loss_fn or parallel.stateless(mlp_loss)
    tx = optax.chain(sharp_tx, sgd())
    step = parallel.make_shard_map_train_step(loss_fn, tx, mesh, AXIS, num_micro_steps=micro)
    state = step.init(params, model_state)
    trajectory = []
    for batch in batches:
        state, _metrics = step(state, step.shard_batch(batch))
        trajectory.append(flat(state.params))
    return np.stack(trajectory), state, step


class BNNet(nn.Module):
    """Dense → BatchNorm → tanh → Dense; ``bn_axis`` averages the batch statistics over devices."""

    bn_axis: str | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=False, momentum=0.8, axis_name=self.bn_axis)(x)
        return nn.Dense(3)(jnp.tanh(x))


def bn_loss_fn(model):
    def loss_fn(params, batch_stats, batch):
        x, y = batch
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (updates["batch_stats"], {"accuracy": jnp.mean(logits.argmax(-1) == y)})

    return loss_fn


def bn_full_batch_reference(params, batch_stats, batches, loss_fn):
    """Single-device full-batch SAM(synced-equivalent) with BatchNorm: flat params, stats."""
    tx = optax.chain(sharpjax.sam(RHO), sgd())
    state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, state, batch):
        (_, (new_stats, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, batch
        )
        grad_fn = lambda p: jax.grad(lambda p: loss_fn(p, batch_stats, batch)[0])(p)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), new_stats, state

    out_p, out_s = [], []
    for batch in batches:
        params, batch_stats, state = step(params, batch_stats, state, batch)
        out_p.append(flat(params))
        out_s.append(flat(batch_stats))
    return np.stack(out_p), np.stack(out_s)


def bn_per_shard_reference(params, batch_stats, batches, loss_fn):
    """Synced SAM with per-device BatchNorm, written out with a vmap over the 8 shards:
    g = mean_j ∇L_j(w), ε = ρ g/‖g‖, final mean_j ∇L_j(w + ε), stats = mean_j stats_j."""
    tx = optax.chain(sharpjax.sam(RHO), sgd())
    state = tx.init(params)

    def shard_loss(p, stats, shard):
        return loss_fn(p, stats, shard)

    @jax.jit
    def step(params, batch_stats, state, batch):
        shards = parallel.shard_for_pmap(batch, N)
        vg = jax.vmap(jax.value_and_grad(shard_loss, has_aux=True), in_axes=(None, None, 0))
        (_, (stats, _)), grads = vg(params, batch_stats, shards)
        g = jax.tree.map(lambda x: x.mean(0), grads)

        def grad_fn(p):
            gs = jax.vmap(jax.grad(lambda p, s: loss_fn(p, batch_stats, s)[0]), (None, 0))(
                p, shards
            )
            return jax.tree.map(lambda x: x.mean(0), gs)

        updates, state = tx.update(g, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), jax.tree.map(lambda x: x.mean(0), stats), state

    out_p, out_s = [], []
    for batch in batches:
        params, batch_stats, state = step(params, batch_stats, state, batch)
        out_p.append(flat(params))
        out_s.append(flat(batch_stats))
    return np.stack(out_p), np.stack(out_s)


def sampa_runs(params, batches, mesh):
    """SAMPa's parallel form on the (pair, batch) = (2, 4) mesh against its sequential form on
    one device (flat params per step), and the per-device cost of the parallel step and of the
    same batched step without the split ("vmap") beside one gradient's (XLA's cost analysis:
    deterministic, no timing)."""

    def make_step(tx):
        @jax.jit
        def step(params, state, batch):
            grads = jax.grad(mlp_loss)(params, batch)
            updates, state = tx.update(
                grads, state, params, grad_fn=lambda p: jax.grad(mlp_loss)(p, batch)
            )
            return optax.apply_updates(params, updates), state

        return step

    def run(tx, place):
        # the state placed like the params: one compilation, not one per input layout
        step, state, p, out = make_step(tx), place(tx.init(params)), place(params), []
        for batch in batches:
            p, state = step(p, state, place(batch, batch=True))
            out.append(flat(p))
        return np.stack(out), step, state

    def on(mesh):
        def place(tree, batch=False):
            return jax.device_put(tree, NamedSharding(mesh, P("batch") if batch else P()))

        return place

    on_mesh = on(mesh)

    def sampa_tx(**kw):
        return optax.chain(sharpjax.sampa(LR, RHO, lam=0.2, **kw), sgd())

    r = {}
    sequential, _, _ = run(sampa_tx(), lambda tree, batch=False: tree)
    parallel_tx = sampa_tx(execution="parallel", mesh=mesh)
    parallel, step, state = run(parallel_tx, on_mesh)
    r["sampa_parallel_vs_sequential"] = diff(parallel, sequential)
    r["sampa_parallel_vs_initial"] = diff(parallel[-1], flat(params))
    # jax.make_mesh's axes are Explicit (jax 0.10): the split is then a reshard.
    explicit = jax.make_mesh((2, N // 2), ("pair", "batch"))
    r["sampa_explicit_mesh_axis_types"] = str(explicit.axis_types)
    explicit_tx = sampa_tx(execution="parallel", mesh=explicit)
    r["sampa_parallel_explicit_vs_sequential"] = diff(run(explicit_tx, on(explicit))[0], sequential)
    args = (on_mesh(params), on_mesh(batches[0], batch=True))
    gradient = jax.jit(jax.grad(mlp_loss)).lower(*args).compile()
    compiled = {
        "parallel": step.lower(args[0], state, args[1]).compile(),
        "vmap": make_step(sampa_tx(execution="vmap")).lower(args[0], state, args[1]).compile(),
        "gradient": gradient,
    }
    costs = {k: c.cost_analysis() for k, c in compiled.items()}
    costs = {k: c[0] if isinstance(c, list) else c for k, c in costs.items()}
    r["sampa_flops"] = {k: float(c["flops"]) for k, c in costs.items()}
    # The dots of the per-device program (a batched pair's counts once; step 0's ∇f(x_0),
    # under lax.cond, is in both steps).
    r["sampa_dots"] = {k: c.as_text().count(" dot(") for k, c in compiled.items()}
    hlo = compiled["parallel"].as_text()
    r["sampa_hlo_collectives"] = sorted(
        op
        for op in ("all-reduce", "all-gather", "collective-permute", "all-to-all")
        if op + "(" in hlo
    )
    r["sampa_mesh_shape"] = dict(mesh.shape)
    return r


def main(out_path: str) -> None:
    assert jax.device_count() == N, jax.devices()
    r: dict = {}
    params = init_params()
    batches = make_batches(STEPS, BATCH)
    mesh = Mesh(np.array(jax.devices()), (AXIS,))

    def sam(mode, **kw):
        return sharpjax.sam(RHO, axis_name=AXIS, perturbation_mode=mode, **kw)

    # --- SAM: synced = full batch; per-device = msam(8); grouped(k=2) = msam(4).
    full = full_batch_reference(sharpjax.sam(RHO), params, batches)
    msam8 = msam_reference(params, batches, N)
    msam4 = msam_reference(params, batches, N // 2)
    synced, _, spread_synced = run_pmap(sam("synced"), params, batches)
    per_dev, _, spread_per_dev = run_pmap(sam("per_device"), params, batches)
    r["pmap_synced_vs_full_batch"] = diff(synced, full)
    r["pmap_per_device_vs_msam8"] = diff(per_dev, msam8)
    r["pmap_per_device_vs_full_batch"] = diff(per_dev, full)
    r["pmap_replica_spread"] = max(spread_synced, spread_per_dev)

    grouped = {k: run_pmap(sam("grouped", group_size=k), params, batches)[0] for k in (1, 2, 8)}
    r["grouped8_vs_synced"] = diff(grouped[8], synced)
    r["grouped1_vs_per_device"] = diff(grouped[1], per_dev)
    r["grouped2_vs_synced"] = diff(grouped[2], synced)
    r["grouped2_vs_per_device"] = diff(grouped[2], per_dev)
    r["grouped2_vs_msam4"] = diff(grouped[2], msam4)

    # --- VaSSO and SANER, per device and synced.
    for name, make, rule in (
        ("vasso", lambda **kw: sharpjax.vasso(RHO, theta=0.9, **kw), "vasso"),
        ("saner", lambda **kw: sharpjax.saner(RHO, alpha=0.5, **kw), "saner"),
    ):
        got_synced, _, _ = run_pmap(
            make(axis_name=AXIS, perturbation_mode="synced"), params, batches
        )
        r[f"{name}_pmap_synced_vs_full_batch"] = diff(
            got_synced, full_batch_reference(make(), params, batches)
        )
        got_per_dev, state, _ = run_pmap(make(axis_name=AXIS), params, batches)
        r[f"{name}_pmap_per_device_vs_equations"] = diff(
            got_per_dev, per_device_equations(params, batches, N, rule)
        )
        r[f"{name}_per_device_vs_synced"] = diff(got_per_dev, got_synced)
        if name == "vasso":
            d = np.asarray(state.opt_state[0].perturbation_state.d["hidden"]["kernel"])
            r["vasso_pmap_d_spread"] = diff(d, d[:1])

    # --- shard_map equals pmap; per-device really uses the local gradient there.
    sm_synced, _, _ = run_shard_map(sam("synced"), params, batches, mesh)
    sm_per_dev, _, _ = run_shard_map(sam("per_device"), params, batches, mesh)
    sm_grouped2, _, _ = run_shard_map(sam("grouped", group_size=2), params, batches, mesh)
    r["shard_map_vs_pmap_synced"] = diff(sm_synced, synced)
    r["shard_map_vs_pmap_per_device"] = diff(sm_per_dev, per_dev)
    r["shard_map_vs_pmap_grouped2"] = diff(sm_grouped2, grouped[2])
    r["shard_map_per_device_vs_msam8"] = diff(sm_per_dev, msam8)
    r["shard_map_per_device_vs_synced"] = diff(sm_per_dev, sm_synced)
    vasso_pd = sharpjax.vasso(RHO, theta=0.9, axis_name=AXIS)
    # jax.make_mesh gives Explicit axes (jax 0.10), the Mesh above Auto ones: both must work.
    explicit = jax.make_mesh((N,), (AXIS,))
    r["explicit_mesh_axis_types"] = str(explicit.axis_types)
    sm_vasso, sm_vasso_state, sm_vasso_step = run_shard_map(vasso_pd, params, batches, explicit)
    r["shard_map_vasso_per_device_vs_equations"] = diff(
        sm_vasso, per_device_equations(params, batches, N, "vasso")
    )
    specs = sm_vasso_step.opt_state_specs(params)
    r["shard_map_vasso_d_spec"] = str(specs[0].perturbation_state.d["hidden"]["kernel"])
    r["shard_map_vasso_count_spec"] = str(specs[0].count)
    r["shard_map_momentum_spec"] = str(jax.tree.leaves(specs[1])[0])
    d_state = sm_vasso_state.opt_state[0].perturbation_state
    r["shard_map_vasso_d_shape"] = list(d_state.d["out"]["bias"].shape)
    r["shard_map_per_device_micro2_vs_msam8"] = diff(
        run_shard_map(sam("per_device"), params, batches, mesh, micro=2)[0], msam8
    )

    # --- BatchNorm: flax BatchNorm(axis_name) on 8 devices = full-batch BN on one device;
    # per-device BN statistics are averaged by the step.
    x0 = jnp.zeros((1, 6))
    variables = BNNet().init(jax.random.key(3), x0)
    bn_params, bn_stats = variables["params"], variables["batch_stats"]
    want_p, want_s = bn_full_batch_reference(bn_params, bn_stats, batches[:3], bn_loss_fn(BNNet()))
    for path in ("pmap", "shard_map"):
        loss_fn = bn_loss_fn(BNNet(bn_axis=AXIS))
        if path == "pmap":
            got, state, _ = run_pmap(
                sam("synced"), bn_params, batches[:3], loss_fn=loss_fn, model_state=bn_stats
            )
            stats = flat(host_first(state.model_state))
        else:
            got, state, _ = run_shard_map(
                sam("synced"), bn_params, batches[:3], mesh, loss_fn=loss_fn, model_state=bn_stats
            )
            stats = flat(state.model_state)
        r[f"bn_axis_{path}_params_vs_full_batch"] = diff(got, want_p)
        r[f"bn_axis_{path}_stats_vs_full_batch"] = diff(stats, want_s[-1])
    want_p, want_s = bn_per_shard_reference(bn_params, bn_stats, batches[:3], bn_loss_fn(BNNet()))
    got, state, _ = run_pmap(
        sam("synced"), bn_params, batches[:3], loss_fn=bn_loss_fn(BNNet()), model_state=bn_stats
    )
    r["bn_local_pmap_params_vs_reference"] = diff(got, want_p)
    r["bn_local_pmap_stats_vs_mean_of_shards"] = diff(
        flat(host_first(state.model_state)), want_s[-1]
    )
    got, state, _ = run_shard_map(
        sam("synced"),
        bn_params,
        batches[:3],
        mesh,
        loss_fn=bn_loss_fn(BNNet()),
        model_state=bn_stats,
    )
    r["bn_local_shard_map_stats_vs_mean_of_shards"] = diff(flat(state.model_state), want_s[-1])

    # --- Bad input: a group size that does not divide the 8 devices.
    for path in ("pmap", "shard_map"):
        try:
            runner = run_pmap if path == "pmap" else lambda *a: run_shard_map(*a, mesh)
            runner(sam("grouped", group_size=3), params, batches[:1])
            r[f"bad_group_size_{path}"] = "no error"
        except ValueError as err:
            r[f"bad_group_size_{path}"] = str(err)

    # --- SAMPa: its two gradients on the two halves of a (pair, batch) = (2, 4) mesh.
    r.update(sampa_runs(params, batches, sharpjax.sampa_mesh()))

    with open(out_path, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
