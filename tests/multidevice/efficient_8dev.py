"""The efficient variants' decisions on 8 forced CPU devices.

Usage: ``python -m tests.multidevice.efficient_8dev OUT.json``. Writes ``{check: value}``;
tests/test_efficient_multidevice.py asserts on them. For RST, AE-SAM and LookSAM:

* synced mode against single-device training on the whole batch (the same decisions must
  follow: the policy sees the all-device ‖g‖², and the key is the same);
* per-device mode (each device perturbs with its own, different, gradient): every step's
  ``second_gradient`` (averaged over devices by the core) is exactly 0 or 1, the policy state,
  the count of second gradients and the params are identical on every device, and the
  devices' own ‖g_d‖² differ (so a decision from the local gradient would not agree).
"""

from __future__ import annotations

import os

from tests.multidevice.runner import cpu_device_flags

os.environ["XLA_FLAGS"] = cpu_device_flags(8)  # before jax is imported

import json
import sys

import jax
import numpy as np
import optax

import sharpjax
from sharpjax import parallel
from sharpjax.parallel import TrainState
from tests.multidevice.common import (
    RHO,
    flat,
    full_batch_reference,
    init_params,
    make_batches,
    mlp_loss,
    sgd,
)

N, STEPS, BATCH = 8, 8, 32
AXIS = "batch"

VARIANTS = {
    "rst": lambda **kw: sharpjax.random_sam(RHO, 0.5, seed=2, **kw),
    "ae_sam": lambda **kw: sharpjax.ae_sam(RHO, 0.0, delta=0.5, **kw),
    "looksam": lambda **kw: sharpjax.looksam(RHO, 3, 0.7, **kw),
}


def spread(tree) -> float:
    """Largest difference between any device's copy and device 0's, over all leaves."""
    leaves = [np.asarray(x).astype(np.float64) for x in jax.tree.leaves(tree)]
    return max((float(np.max(np.abs(x - x[:1]))) for x in leaves if x.size), default=0.0)


def run_pmap(sharp_tx, params, batches):
    tx = optax.chain(sharp_tx, sgd())
    step = parallel.make_pmap_train_step(parallel.stateless(mlp_loss), tx, AXIS)
    state = parallel.replicate(TrainState(params, None, tx.init(params)), AXIS)
    trajectory, decisions, widest = [], [], 0.0
    for batch in batches:
        state, _ = step(state, parallel.shard_for_pmap(batch, N))
        sharp = state.opt_state[0]  # the SharpnessAwareState of the chain
        # Rule states may differ (LookSAM's g_v is per device, like VaSSO's d); the decision's
        # inputs and the params may not.
        decided = (sharp.policy_state, sharp.second_gradients, sharp.count)
        widest = max(widest, spread(state.params), spread(decided))
        trajectory.append(flat(jax.tree.map(lambda x: np.asarray(x)[0], state.params)))
        diag = sharpjax.diagnostics(state.opt_state)
        decisions.append(float(np.asarray(diag["second_gradient"])[0]))
    return np.stack(trajectory), decisions, widest


def local_sq_norm_spread(params, batch) -> float:
    """max/min over devices of their own ‖g_d‖² at the initial params."""
    shards = parallel.shard_for_pmap(batch, N)
    norms = []
    for j in range(N):
        shard = jax.tree.map(lambda a, j=j: np.asarray(a)[j], shards)
        g = flat(jax.grad(mlp_loss)(params, shard))
        norms.append(float(g @ g))
    return max(norms) / min(norms)


def main(out_path: str) -> None:
    assert jax.device_count() == N, jax.devices()
    params = init_params()
    batches = make_batches(STEPS, BATCH)
    r: dict[str, object] = {"local_sq_norm_ratio": local_sq_norm_spread(params, batches[0])}
    for name, make in VARIANTS.items():
        full = full_batch_reference(make(), params, batches)
        synced, synced_decisions, synced_spread = run_pmap(
            make(axis_name=AXIS, perturbation_mode="synced"), params, batches
        )
        r[f"{name}_synced_vs_full_batch"] = float(np.max(np.abs(synced - full)))
        _, decisions, widest = run_pmap(make(axis_name=AXIS), params, batches)
        r[f"{name}_per_device_decisions"] = decisions
        r[f"{name}_synced_decisions"] = synced_decisions
        r[f"{name}_replica_spread"] = max(widest, synced_spread)
    with open(out_path, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
