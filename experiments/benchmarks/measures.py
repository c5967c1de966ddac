"""Cost of the sharpness measures: exact Hessian diagonal against one HVP per parameter,
Hutchinson trace, top eigenvalues and Minimum Sharpness, on an MLP and a LeNet on 8×8 digits.

The exact diagonal (per-example GGN, ``sharpness.hessian_diagonal``) is compared with the
baseline of the Minimum Sharpness paper (Ibayashi et al., arXiv 2106.12612): one
Hessian-vector product per parameter with a one-hot vector, timed on ``subset`` random
parameters and extrapolated linearly to the whole network (its values on the subset are
checked against the exact diagonal). Minimum Sharpness is split into the diagonal (computed
once, passed with ``diagonal=``) and the solve. Every function is jitted, called once to
compile, then timed by the harness in interleaved rounds (one call of each measure per round).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from benchmarks import harness
from sharpjax import sharpness

TITLE = "Cost of the sharpness measures on 8×8 digits"
DEFAULTS: dict[str, Any] = {
    "examples": 1000,
    "rounds": 5,
    "subset": 200,
    "trace_samples": 100,
    "k": 5,
    "lanczos": 50,
    "hidden": [128, 128],
    "models": ["mlp", "lenet"],
}
QUICK: dict[str, Any] = {
    "examples": 32,
    "rounds": 2,
    "subset": 3,
    "trace_samples": 2,
    "k": 2,
    "lanczos": 4,
    "hidden": [8],
    "models": ["mlp"],
}


def digits(num_examples: int) -> tuple[jax.Array, jax.Array]:
    """sklearn's 8×8 digits (1797 images), NHWC in [0, 1], first ``num_examples``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if num_examples > len(data.target):
        raise ValueError(f"measures: examples must be <= {len(data.target)}, got {num_examples}")
    x = (data.images[:num_examples, :, :, None] / 16.0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(data.target[:num_examples].astype(np.int32))


def eigenvalues_of(result: Any) -> jax.Array:
    """The eigenvalues of ``top_eigenvalues``'s result (its ``EigenvalueEstimate.value``, or
    the bare array it returned before)."""
    return result.value if hasattr(result, "value") else result


def bench_model(name: str, model, x, y, config: dict[str, Any]) -> tuple[dict, list[float]]:
    params = model.init(jax.random.key(0), x[:1])["params"]
    logits_fn = lambda p, inputs: model.apply({"params": p}, inputs)

    def loss(p, x, y):
        log_p = jax.nn.log_softmax(logits_fn(p, x))
        return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))

    flat, unravel = ravel_pytree(params)
    num_params = flat.size
    key = jax.random.key(1)
    row: dict[str, Any] = {"name": name, "model": name, "params": int(num_params)}
    row["examples"] = int(x.shape[0])

    # The data are arguments of every jitted function: a loss closing over them would bake
    # them into the program as constants (slow to compile: constant-folded max-pools).
    diagonal = jax.jit(partial(sharpness.hessian_diagonal, logits_fn))
    subset = np.random.default_rng(0).choice(num_params, min(config["subset"], num_params), False)

    @jax.jit
    def diagonal_entry(p, j, x, y):
        e_j = unravel(jnp.zeros_like(flat).at[j].set(1))
        return ravel_pytree(sharpness.hvp(lambda q: loss(q, x, y), p, e_j))[0][j]

    def baseline():
        # A Python loop of jitted HVPs (inside lax.map the CNN's ran ~1.7× slower).
        return jnp.stack([diagonal_entry(params, j, x, y) for j in subset])

    @jax.jit
    def one_hvp(p, x, y):
        return sharpness.hvp(lambda q: loss(q, x, y), p, p)

    @jax.jit
    def trace(p, key, x, y):
        return sharpness.hessian_trace(lambda q: loss(q, x, y), p, key, config["trace_samples"])

    @jax.jit
    def top(p, key, x, y):
        return sharpness.top_eigenvalues(
            lambda q: loss(q, x, y), p, key, k=config["k"], num_iterations=config["lanczos"]
        )

    diag = jax.block_until_ready(diagonal(params, (x, y)))
    calls = {
        "exact_diagonal": lambda: diagonal(params, (x, y)),
        "baseline_subset": baseline,
        "one_hvp": lambda: one_hvp(params, x, y),
        "hutchinson": lambda: trace(params, key, x, y),
        "top_k": lambda: top(params, key, x, y),
    }
    outputs = {}
    for granularity in ("layer", "node"):
        ms = jax.jit(partial(sharpness.minimum_sharpness, logits_fn, granularity=granularity))
        solve = jax.jit(
            lambda p, batch, d, g=granularity: sharpness.minimum_sharpness(
                logits_fn, p, batch, granularity=g, diagonal=d
            )
        )
        calls[f"min_sharpness_{granularity}"] = lambda ms=ms: ms(params, (x, y))
        calls[f"min_sharpness_{granularity}_solve"] = lambda s=solve: s(params, (x, y), diag)
    for call_name, call in calls.items():  # compile and keep each output
        outputs[call_name] = jax.block_until_ready(call())
    times, loads = harness.interleaved(calls, config["rounds"], window=1, warmup=0)
    for call_name, values in times.items():
        row[f"{call_name}_s"] = float(np.median(values))
    row["baseline_subset"] = len(subset)
    row["baseline_full_s_extrapolated"] = row["baseline_subset_s"] * num_params / len(subset)
    row["speedup"] = row["baseline_full_s_extrapolated"] / row["exact_diagonal_s"]
    exact = np.asarray(ravel_pytree(diag)[0])[subset]
    scale = np.max(np.abs(exact)) + 1e-30
    difference = np.max(np.abs(np.asarray(outputs["baseline_subset"]) - exact)) / scale
    row["baseline_max_abs_diff_rel"] = float(difference)
    est = outputs["hutchinson"]
    row["hutchinson_hvps"] = config["trace_samples"]
    row["hutchinson_trace"] = float(est.value)
    row["hutchinson_std_error"] = float(est.std_error)
    row["exact_trace"] = float(sum(np.sum(d) for d in jax.tree.leaves(diag)))
    row["top_k"] = config["k"]
    row["top_k_hvps"] = min(config["lanczos"], int(num_params))
    row["top_eigenvalues"] = [float(v) for v in eigenvalues_of(outputs["top_k"])]
    limit = float(np.sqrt(np.finfo(np.float32).eps))
    for g in ("layer", "node"):
        result = outputs[f"min_sharpness_{g}"]
        # Under jit the output check cannot raise: its value is read back and checked here.
        if not float(result.output_change) <= limit:
            raise RuntimeError(f"{name}: rescaling changed the logits by {result.output_change}")
        row[f"min_sharpness_{g}"] = float(result.value)
        row[f"min_sharpness_{g}_from_diagonal"] = float(outputs[f"min_sharpness_{g}_solve"].value)
        row[f"newton_steps_{g}"] = int(result.num_steps)
        row[f"output_change_{g}"] = float(result.output_change)
    return row, loads


def run(config: dict[str, Any]) -> harness.Record:
    from sharpjax.models import MLP, LeNet

    record = harness.new_record("measures", TITLE, config)
    x, y = digits(config["examples"])
    models = {
        "mlp": MLP(num_classes=10, hidden_sizes=tuple(config["hidden"])),
        "lenet": LeNet(num_classes=10),
    }
    all_loads = []
    for name in config["models"]:
        row, loads = bench_model(name, models[name], x, y, config)
        record["rows"].append(row)
        all_loads += loads
    print(table(record), flush=True)
    return harness.finish(record, all_loads)


def table(record: harness.Record) -> str:
    rows = {r["model"]: r for r in record["rows"]}
    s = lambda key: lambda r: f"{r[key]:.3g} s"
    lines = [
        ("exact Hessian diagonal (per-example GGN)", s("exact_diagonal_s")),
        (
            "one HVP per parameter (extrapolated)",
            lambda r: f"{r['baseline_full_s_extrapolated']:.4g} s (from {r['baseline_subset']})",
        ),
        ("speed-up of the exact diagonal", lambda r: f"{r['speedup']:.0f}×"),
        (
            "Hutchinson trace",
            lambda r: f"{r['hutchinson_s']:.3g} s ({r['hutchinson_hvps']} HVPs)",
        ),
        (
            "top eigenvalues, Lanczos",
            lambda r: f"{r['top_k_s']:.3g} s (top-{r['top_k']}, {r['top_k_hvps']} HVPs)",
        ),
        (
            "Minimum Sharpness, layer-wise",
            lambda r: f"{r['min_sharpness_layer_s']:.3g} s ({r['newton_steps_layer']} steps)",
        ),
        (
            "Minimum Sharpness, node-wise",
            lambda r: f"{r['min_sharpness_node_s']:.3g} s ({r['newton_steps_node']} steps)",
        ),
    ]
    names = {"mlp": "MLP", "lenet": "LeNet"}
    columns = [("measure", lambda line: line[0])]
    for model, r in rows.items():
        header = f"{names.get(model, model)} ({r['params']:,} params)"
        columns.append((header, lambda line, r=r: line[1](r)))
    return harness.table(lines, columns)
