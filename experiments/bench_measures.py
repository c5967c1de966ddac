"""Cost of the sharpness measures: exact Hessian diagonal vs double back-propagation, trace,
top eigenvalues and Minimum Sharpness, on an MLP and a LeNet-style CNN on 8x8 digits.

Minimum Sharpness is split into its two costs: the exact diagonal, which a caller computes once
and passes to both granularities with ``diagonal=``, and the solve (Newton plus the check
that the rescaling preserves the logits).

The exact diagonal (per-example GGN, ``sharpness.hessian_diagonal``) is compared with the
baseline of the Minimum Sharpness paper (Ibayashi et al., arXiv 2106.12612, who report
0.018 s against 10.7 s): one Hessian-vector product per parameter with a one-hot vector.
The baseline is timed on a subset of parameters and extrapolated linearly to the whole
network (the table says so); its values on the subset are checked against the exact
diagonal. Every function is jitted and timed after a warm-up call, with
``block_until_ready``; we report the median of ``--repeats`` calls. Parameters are at
initialisation: the costs do not depend on training.

    python experiments/bench_measures.py --examples 1000 --repeats 5 \\
        --out results/benchmarks/measures.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sharpjax import sharpness
from sharpjax.models import MLP, LeNet


def digits(num_examples: int) -> tuple[jax.Array, jax.Array]:
    """sklearn's 8x8 digits (1797 images), NHWC in [0, 1], first ``num_examples``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if num_examples > len(data.target):
        raise ValueError(f"--examples must be <= {len(data.target)}, got {num_examples}")
    x = (data.images[:num_examples, :, :, None] / 16.0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(data.target[:num_examples].astype(np.int32))


def timed(fn: Callable, *args: Any, repeats: int) -> tuple[float, float, Any]:
    """(first call incl. compilation, median of ``repeats`` later calls) in seconds, output."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, float(np.median(times)), out


def bench_model(name, model, x, y, args) -> dict[str, Any]:
    params = model.init(jax.random.key(0), x[:1])["params"]
    logits_fn = lambda p, inputs: model.apply({"params": p}, inputs)

    def loss(p, x, y):
        log_p = jax.nn.log_softmax(logits_fn(p, x))
        return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))

    flat, unravel = ravel_pytree(params)
    num_params = flat.size
    key = jax.random.key(1)
    rep = {"repeats": args.repeats}
    row: dict[str, Any] = {"params": int(num_params), "examples": int(x.shape[0])}

    diagonal = jax.jit(partial(sharpness.hessian_diagonal, logits_fn))
    _, t_diag, diag = timed(diagonal, params, (x, y), **rep)
    row["exact_diagonal_s"] = t_diag

    # The data are arguments of every jitted function below: a loss closing over them would
    # bake them into the program as constants (slow to compile: constant-folded max-pools).
    # Baseline: H_jj = e_jᵀ H e_j, one jitted HVP per parameter, one after the other (a Python
    # loop: inside lax.map the HVPs of the CNN ran ~1.7x slower, which would flatter us).
    subset = np.random.default_rng(0).choice(num_params, min(args.subset, num_params), False)

    @jax.jit
    def diagonal_entry(p, j, x, y):
        e_j = unravel(jnp.zeros_like(flat).at[j].set(1))
        return ravel_pytree(sharpness.hvp(lambda q: loss(q, x, y), p, e_j))[0][j]

    def baseline(p, indices, x, y):
        return jnp.stack([diagonal_entry(p, j, x, y) for j in indices])

    _, t_subset, values = timed(baseline, params, subset, x, y, **rep)
    exact = np.asarray(ravel_pytree(diag)[0])[subset]
    row["baseline_subset"] = len(subset)
    row["baseline_subset_s"] = t_subset
    row["baseline_full_s_extrapolated"] = t_subset * num_params / len(subset)
    row["speedup"] = row["baseline_full_s_extrapolated"] / t_diag
    scale = np.max(np.abs(exact)) + 1e-30
    row["baseline_max_abs_diff_rel"] = float(np.max(np.abs(np.asarray(values) - exact)) / scale)

    @jax.jit
    def one_hvp(p, x, y):
        return sharpness.hvp(lambda q: loss(q, x, y), p, p)

    _, row["one_hvp_s"], _ = timed(one_hvp, params, x, y, **rep)

    @jax.jit
    def trace(p, key, x, y):
        return sharpness.hessian_trace(lambda q: loss(q, x, y), p, key, args.trace_samples)

    _, row["hutchinson_s"], est = timed(trace, params, key, x, y, **rep)
    row["hutchinson_hvps"] = args.trace_samples
    row["hutchinson_trace"] = float(est.value)
    row["hutchinson_std_error"] = float(est.std_error)
    row["exact_trace"] = float(sum(np.sum(d) for d in jax.tree.leaves(diag)))

    @jax.jit
    def top(p, key, x, y):
        return sharpness.top_eigenvalues(
            lambda q: loss(q, x, y), p, key, k=args.k, num_iterations=args.lanczos
        )

    _, row["top_k_s"], eigenvalues = timed(top, params, key, x, y, **rep)
    row["top_k"] = args.k
    row["top_k_hvps"] = min(args.lanczos, int(num_params))
    row["top_eigenvalues"] = [float(v) for v in eigenvalues]

    # Cost split: the diagonal (above, shared by both granularities through diagonal=) and the
    # solve (Newton on the block or node sums plus the output check). Under jit the output
    # check cannot raise, so its value is read back and checked here.
    for granularity in ("layer", "node"):
        ms = jax.jit(partial(sharpness.minimum_sharpness, logits_fn, granularity=granularity))
        _, seconds, result = timed(ms, params, (x, y), **rep)
        solve = jax.jit(
            lambda p, batch, d, g=granularity: sharpness.minimum_sharpness(
                logits_fn, p, batch, granularity=g, diagonal=d
            )
        )
        _, solve_s, solved = timed(solve, params, (x, y), diag, **rep)
        limit = float(np.sqrt(np.finfo(np.float32).eps))
        if not float(result.output_change) <= limit:
            raise RuntimeError(f"{name}: rescaling changed the logits by {result.output_change}")
        row[f"min_sharpness_{granularity}_s"] = seconds
        row[f"min_sharpness_{granularity}_solve_s"] = solve_s
        row[f"min_sharpness_{granularity}"] = float(result.value)
        row[f"min_sharpness_{granularity}_from_diagonal"] = float(solved.value)
        row[f"newton_steps_{granularity}"] = int(result.num_steps)
        row[f"output_change_{granularity}"] = float(result.output_change)
    print(f"[{name}] done", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=(
            "Cost of the sharpness measures (exact Hessian diagonal vs one HVP per parameter, "
            "Hutchinson trace, top eigenvalues, Minimum Sharpness with its diagonal/solve "
            "split) on an MLP and a LeNet-style CNN on sklearn's 8x8 digits, on the CPU, "
            "offline. Example: python experiments/bench_measures.py --examples 200 --repeats 2"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--examples", type=int, default=1000, help="digits examples in the batch (at most 1797)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls after the warm-up; the median counts"
    )
    parser.add_argument(
        "--subset",
        type=int,
        default=200,
        help="parameters whose one-hot HVP is timed for the baseline, extrapolated to all",
    )
    parser.add_argument(
        "--trace-samples", type=int, default=100, help="Hutchinson probes (HVPs) for the trace"
    )
    parser.add_argument("--k", type=int, default=5, help="number of top eigenvalues")
    parser.add_argument(
        "--lanczos", type=int, default=50, help="Lanczos iterations (HVPs) for the eigenvalues"
    )
    parser.add_argument(
        "--hidden", type=int, nargs="*", default=[128, 128], help="hidden widths of the MLP"
    )
    parser.add_argument(
        "--out", default="results/benchmarks/measures.json", help="where the JSON results go"
    )
    args = parser.parse_args(argv)

    x, y = digits(args.examples)
    models = {
        "mlp": MLP(num_classes=10, hidden_sizes=tuple(args.hidden)),
        "lenet": LeNet(num_classes=10),
    }
    rows = {name: bench_model(name, model, x, y, args) for name, model in models.items()}
    result = {"hardware": common.hardware(), "args": vars(args), "models": rows}

    def cells(fmt: Callable[[dict[str, Any]], str]) -> list[str]:
        return [fmt(r) for r in rows.values()]

    table = [
        ["parameters", *cells(lambda r: str(r["params"]))],
        ["exact diagonal (per-example GGN)", *cells(lambda r: f"{r['exact_diagonal_s']:.4f} s")],
        [
            "one HVP per parameter (extrapolated)",
            *cells(
                lambda r: (
                    f"{r['baseline_full_s_extrapolated']:.2f} s "
                    f"({r['baseline_subset']} timed: {r['baseline_subset_s']:.3f} s)"
                )
            ),
        ],
        ["speed-up of the exact diagonal", *cells(lambda r: f"{r['speedup']:.0f}x")],
        [
            "baseline vs exact diagonal (max rel. diff)",
            *cells(lambda r: f"{r['baseline_max_abs_diff_rel']:.1e}"),
        ],
        ["one HVP", *cells(lambda r: f"{r['one_hvp_s']:.4f} s")],
        [
            f"Hutchinson trace ({args.trace_samples} HVPs)",
            *cells(
                lambda r: (
                    f"{r['hutchinson_s']:.3f} s ({r['hutchinson_trace']:.4g} ± "
                    f"{r['hutchinson_std_error']:.2g}; exact {r['exact_trace']:.4g})"
                )
            ),
        ],
        [
            f"top-{args.k} eigenvalues (Lanczos)",
            *cells(lambda r: f"{r['top_k_s']:.3f} s ({r['top_k_hvps']} HVPs)"),
        ],
    ]
    for g in ("layer", "node"):
        table.append(
            [
                f"Minimum Sharpness ({g})",
                *cells(
                    lambda r, g=g: (
                        f"{r[f'min_sharpness_{g}_s']:.4f} s "
                        f"(value {r[f'min_sharpness_{g}']:.4g}, "
                        f"{r[f'newton_steps_{g}']} Newton steps)"
                    )
                ),
            ]
        )
        table.append(
            [
                f"  of which solve + output check ({g}, diagonal= given)",
                *cells(
                    lambda r, g=g: (
                        f"{r[f'min_sharpness_{g}_solve_s']:.4f} s "
                        f"(diagonal {r['exact_diagonal_s']:.4f} s)"
                    )
                ),
            ]
        )
    hw = result["hardware"]
    print(
        f"\n{hw['device']} ({hw['cpu']}, {hw['nproc']} cores), {args.examples} digits examples, "
        f"median of {args.repeats} jitted calls after warm-up; the baseline is timed on "
        f"{args.subset} random parameters and extrapolated linearly to all parameters.\n"
    )
    print(common.markdown_table(["measure", *rows], table))
    common.write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
