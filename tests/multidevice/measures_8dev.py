"""Every sharpness measure on a batch sharded over 8 forced CPU devices vs on one device.

Usage: ``python -m tests.multidevice.measures_8dev OUT.json``. Writes ``{check: value}``: for
each measure the largest difference between the sharded and the one-device result, relative to
the result's largest magnitude, and a few facts about the sharded run (how many devices held
the batch, whether the compiled program all-reduces); tests/test_sharpness_multidevice.py
asserts on them. The one-device references are the same public functions on the same arrays
placed on device 0; only the placement of the batch differs.
"""

from __future__ import annotations

import os

from tests.multidevice.runner import cpu_device_flags

os.environ["XLA_FLAGS"] = cpu_device_flags(8)  # before jax is imported

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharpjax import sharpness
from tests.multidevice.common import CLASSES, DIM, init_params

N, BATCH = 8, 64


def logits_fn(params, x):
    # ReLU, so that Minimum Sharpness's rescaling check holds.
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


LOSS = sharpness.SoftmaxCrossEntropy(logits_fn)


def rel(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def measures(params, batch) -> dict:
    """Every measure on ``batch`` (placed however the caller placed it)."""
    key = jax.random.key(0)
    batches = [batch]
    v = jax.tree.map(lambda w: jnp.cos(jnp.arange(w.size, dtype=w.dtype)).reshape(w.shape), params)
    out = {
        "hvp": sharpness.hvp(LOSS, params, v, batches=batches),
        "ggn_product": sharpness.ggn_vector_product(logits_fn, params, v, batch),
        "fisher_product": sharpness.fisher_vector_product(logits_fn, params, v, batch),
        "trace_hutchinson": sharpness.hessian_trace(LOSS, params, key, 30, batches=batches).value,
        "trace_hutchpp": sharpness.hessian_trace(
            LOSS, params, key, 30, "hutch++", batches=batches
        ).value,
        "trace_ggn": sharpness.hessian_trace(
            LOSS, params, key, 30, curvature="ggn", batches=batches
        ).value,
        "trace_per_layer": {
            k: t.value
            for k, t in sharpness.hessian_trace(
                LOSS, params, key, 30, per_layer=True, batches=batches
            ).items()
        },
        "top_eigenvalues": sharpness.top_eigenvalues(LOSS, params, key, 3, 20, batches=batches),
        "top_eigenvalues_fisher": sharpness.top_eigenvalues(
            LOSS, params, key, 3, 20, curvature="fisher", batches=batches
        ),
        "top_eigenvalues_per_layer": sharpness.top_eigenvalues(
            LOSS, params, key, 2, 20, per_layer=True, batches=batches
        ),
        "spectral_density": sharpness.spectral_density(
            LOSS, params, key, 20, grid=jnp.linspace(-1, 3, 200), sigma=0.05, batches=batches
        )[1],
        "landscape": sharpness.loss_landscape(
            LOSS, params, key, 2, jnp.linspace(-1, 1, 5), batches=batches
        ).losses,
        "hessian_diagonal": sharpness.hessian_diagonal(logits_fn, params, batch),
        "adaptive_average": sharpness.adaptive_sharpness(
            LOSS, params, 0.05, "average", key, num_samples=20, batches=batches
        ).value,
        "adaptive_worst": sharpness.adaptive_sharpness(
            LOSS, params, 0.05, "worst", num_steps=5, batches=batches
        ).value,
        "minimum_sharpness": sharpness.minimum_sharpness(logits_fn, params, batch).value,
    }
    return out


def main(path: str) -> None:
    assert jax.device_count() == N, jax.devices()
    params = init_params(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
    one = jax.device_put((x, y), jax.devices()[0])
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharded = jax.device_put((x, y), NamedSharding(mesh, PartitionSpec("batch")))
    params_one = jax.device_put(params, jax.devices()[0])
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))  # replicated

    reference = measures(params_one, one)
    parallel = measures(params, sharded)
    results = {name: rel(parallel[name], reference[name]) for name in reference}
    results["devices_holding_the_batch"] = len(sharded[0].sharding.device_set)

    # Inside the caller's own jit, with the sharded batch as an argument (the tracing path).
    key = jax.random.key(1)

    def inside(params, x, y):
        loss = lambda p: LOSS(p, (x, y))
        return (
            sharpness.top_eigenvalues(loss, params, key, 2, 15),
            sharpness.hessian_trace(loss, params, key, 20, "hutch++").value,
        )

    jitted = jax.jit(inside)
    results["inside_jit"] = rel(jitted(params, *sharded), jitted(params_one, *one))
    hlo = jitted.lower(params, *sharded).compile().as_text()
    results["inside_jit_all_reduces"] = "all-reduce" in hlo
    Path(path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
