"""One process of the 2-process multi-host check (``jax.distributed`` on localhost, CPU/gloo).

Usage: ``python -m tests.multidevice.multihost_worker PROCESS_ID NUM_PROCESSES PORT OUT.npz``.
Each process has 2 CPU devices; the global mesh has ``2 × NUM_PROCESSES`` devices. Each process
feeds its contiguous slice of every global batch, trains with the shard_map step, and saves
the flat params after each step (identical on every process, which the test checks).
"""

from __future__ import annotations

import os

from tests.multidevice.runner import cpu_device_flags

os.environ["XLA_FLAGS"] = cpu_device_flags(2)  # before jax is imported

import sys

import jax
import numpy as np
import optax
from jax.sharding import Mesh

import sharpjax
from sharpjax import parallel
from tests.multidevice.common import RHO, flat, init_params, make_batches, mlp_loss, sgd

AXIS, STEPS, BATCH = "batch", 4, 16


def main(process_id: int, num_processes: int, port: int, out_path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        # The other process may still be importing jax on a busy machine: wait long. A peer
        # that dies ends the test at once (the runner stops the other), a hang after 600 s.
        initialization_timeout=3600,
    )
    assert jax.process_count() == num_processes and jax.local_device_count() == 2
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    params = init_params()
    batches = make_batches(STEPS, BATCH)
    rows = BATCH // num_processes
    local_batches = [
        tuple(a[process_id * rows : (process_id + 1) * rows] for a in batch) for batch in batches
    ]
    out = {"device_count": np.array(jax.device_count())}
    variants = {
        "sam_synced": sharpjax.sam(RHO, axis_name=AXIS, perturbation_mode="synced"),
        "vasso_per_device": sharpjax.vasso(RHO, theta=0.9, axis_name=AXIS),
    }
    for name, sharp_tx in variants.items():
        tx = optax.chain(sharp_tx, sgd())
        step = parallel.make_shard_map_train_step(parallel.stateless(mlp_loss), tx, mesh, AXIS)
        state = step.init(params)
        trajectory, losses = [], []
        for local in local_batches:
            state, metrics = step(state, step.shard_batch(local))
            trajectory.append(flat(state.params))  # replicated: readable on every process
            losses.append(float(metrics["loss"]))
        out[name] = np.stack(trajectory)
        out[f"{name}_loss"] = np.array(losses)
    np.savez(out_path, **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
