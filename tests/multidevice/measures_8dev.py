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

import itertools
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
        "top_eigenvalues": sharpness.top_eigenvalues(
            LOSS, params, key, 3, 20, batches=batches
        ).value,
        "top_eigenvalues_fisher": sharpness.top_eigenvalues(
            LOSS, params, key, 3, 20, curvature="fisher", batches=batches
        ).value,
        "top_eigenvalues_per_layer": {
            k: r.value
            for k, r in sharpness.top_eigenvalues(
                LOSS, params, key, 2, 20, per_layer=True, batches=batches
            ).items()
        },
        "spectral_density": sharpness.spectral_density(
            LOSS, params, key, 20, grid=jnp.linspace(-1, 3, 200), sigma=0.05, batches=batches
        ).density,
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
            sharpness.top_eigenvalues(loss, params, key, 2, 15).value,
            sharpness.hessian_trace(loss, params, key, 20, "hutch++").value,
        )

    jitted = jax.jit(inside)
    results["inside_jit"] = rel(jitted(params, *sharded), jitted(params_one, *one))
    hlo = jitted.lower(params, *sharded).compile().as_text()
    results["inside_jit_all_reduces"] = "all-reduce" in hlo

    results.update(sharded_params(params_one, one, mesh))
    results.update(memory_per_device())
    Path(path).write_text(json.dumps(results, indent=1))


def split_spec(shape, axis: str = "fsdp") -> PartitionSpec:
    """Split a leaf along its last axis that ``N`` divides (a kernel's output axis first, else
    its input axis); replicate it when none does."""
    for dim in reversed(range(len(shape))):
        if shape[dim] % N == 0:
            return PartitionSpec(*(axis if d == dim else None for d in range(len(shape))))
    return PartitionSpec()


def shard_params(params, mesh):
    return jax.tree.map(
        lambda w: jax.device_put(w, NamedSharding(mesh, split_spec(w.shape, mesh.axis_names[0]))),
        params,
    )


def param_measures(params, x, y) -> dict:
    """The measures of issue 18.4 on whole-batch losses (params sharded or not)."""
    key = jax.random.key(2)
    loss = lambda p: LOSS(p, (x, y))
    v = jax.tree.map(lambda w: jnp.sin(jnp.arange(w.size, dtype=w.dtype)).reshape(w.shape), params)
    eigen = sharpness.top_eigenvalues(loss, params, key, 5, 20, return_eigenvectors=True)
    return {
        "hvp": sharpness.hvp(loss, params, v),
        "top5": eigen.value,
        "eigenvectors": eigen.eigenvectors,
        "hutchpp": sharpness.hessian_trace(loss, params, key, 30, "hutch++").value,
        "hutchinson": sharpness.hessian_trace(loss, params, key, 30).value,
        "density": sharpness.spectral_density(
            loss, params, key, 20, grid=jnp.linspace(-1, 3, 200), sigma=0.05
        ).density,
        "landscape": sharpness.loss_landscape(loss, params, key, 2, jnp.linspace(-1, 1, 5)),
        "adaptive_worst": sharpness.adaptive_sharpness(loss, params, 0.05, num_steps=5),
        "adaptive_average": sharpness.adaptive_sharpness(
            loss, params, 0.05, "average", key, num_samples=20
        ).value,
    }


def sharded_params(params_one, one, mesh) -> dict:
    """Params split 8 ways over a mesh axis ("fsdp") vs the same params on one device: every
    value equal, and every parameter-sized result sharded as its parameter."""
    fsdp = Mesh(mesh.devices, ("fsdp",))
    params = shard_params(params_one, fsdp)
    out = {
        "params_split_8_ways": [
            len({str(s.index) for s in w.addressable_shards}) for w in jax.tree.leaves(params)
        ]
    }
    x, y = (jax.device_put(a, NamedSharding(fsdp, PartitionSpec())) for a in one)
    reference, sharded = param_measures(params_one, *one), param_measures(params, x, y)
    for name in ("hvp", "top5", "hutchpp", "hutchinson", "density", "adaptive_average"):
        out[f"sharded_params/{name}"] = rel(sharded[name], reference[name])
    out["sharded_params/landscape"] = rel(
        sharded["landscape"].losses, reference["landscape"].losses
    )
    out["sharded_params/adaptive_worst"] = rel(
        sharded["adaptive_worst"].value, reference["adaptive_worst"].value
    )
    # Ritz vectors are defined up to sign: compare |⟨u_sharded, u_one⟩| per vector (1 = same).
    pairs = zip(
        jax.tree.leaves(sharded["eigenvectors"]),
        jax.tree.leaves(reference["eigenvectors"]),
        strict=True,
    )
    dots = sum(
        np.sum(np.asarray(a) * np.asarray(b), axis=tuple(range(1, a.ndim))) for a, b in pairs
    )
    out["sharded_params/eigenvector_overlap"] = [float(abs(d)) for d in dots]

    def same_layout(result, stacked: bool) -> bool:
        def leaf(r, w):
            spec = PartitionSpec(*((None,) if stacked else ()), *w.sharding.spec)
            expected = NamedSharding(fsdp, spec)
            return (
                r.sharding.is_equivalent_to(expected, r.ndim)
                and [s.data.shape for s in r.addressable_shards]
                == [expected.shard_shape(r.shape)] * N
            )

        return all(jax.tree.leaves(jax.tree.map(leaf, result, params)))

    out["sharded_params/layout"] = {
        "eigenvectors": same_layout(sharded["eigenvectors"], True),
        "hvp": same_layout(sharded["hvp"], False),
        "landscape_directions": same_layout(sharded["landscape"].directions, True),
        "adaptive_delta": same_layout(sharded["adaptive_worst"].delta, False),
    }
    return out


def memory_per_device() -> dict:
    """XLA's per-device memory (arguments + temporaries) of the Lanczos and Hutch++ programs on
    an MLP of 400k parameters split over 1, 2, 4 and 8 devices: the Krylov basis (20 vectors)
    and the probes dominate, and are kept in the params' layout, so it falls with the shard
    count. Compiled from the arrays' shapes and shardings; nothing runs."""
    from sharpjax.sharpness._batches import compile_measure
    from sharpjax.sharpness.curvature import Operator
    from sharpjax.sharpness.hvp import _hessian_trace
    from sharpjax.sharpness.lanczos import _top_eigenvalues

    widths = (64, 512, 512, 256, 16)
    rng = np.random.default_rng(0)
    params = {
        f"Dense_{i}": {
            "kernel": rng.normal(size=(a, b)).astype(np.float32) / np.sqrt(a),
            "bias": np.zeros(b, np.float32),
        }
        for i, (a, b) in enumerate(itertools.pairwise(widths))
    }
    x = rng.normal(size=(64, widths[0])).astype(np.float32)
    y = rng.integers(0, widths[-1], size=64).astype(np.int32)

    def logits(p, x):
        for i in range(len(widths) - 1):
            x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
            x = jax.nn.relu(x) if i < len(widths) - 2 else x
        return x

    ce = sharpness.SoftmaxCrossEntropy(logits)
    key = jax.random.key(0)
    programs = {
        "lanczos": (_top_eigenvalues, dict(k=5, m=20, vectors=True, operator=Operator())),
        "hutchpp": (
            _hessian_trace,
            dict(num_samples=30, method="hutch++", operator=Operator()),
        ),
    }
    out = {"memory/num_params": int(sum(np.size(w) for w in jax.tree.leaves(params)))}
    for n in (1, 2, 4, 8):
        mesh = Mesh(np.array(jax.devices()[:n]), ("fsdp",))
        placed = shard_params(params, mesh) if n > 1 else jax.device_put(params, jax.devices()[0])
        data = jax.device_put((x, y), NamedSharding(mesh, PartitionSpec()))
        loss = lambda p, data=data: ce(p, data)
        for name, (impl, static) in programs.items():
            memory = compile_measure(impl, loss, placed, key, **static).memory_analysis()
            out[f"memory/{name}/{n}"] = {
                "arguments": memory.argument_size_in_bytes,
                "temporaries": memory.temp_size_in_bytes,
                "outputs": memory.output_size_in_bytes,
            }
    return out


if __name__ == "__main__":
    main(sys.argv[1])
