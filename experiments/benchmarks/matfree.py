"""sharpjax's Lanczos, SLQ and trace estimators against matfree 0.6 at the same matvec budget.

On small networks (an MLP and a LeNet-style CNN on 8x8 digits, at initialisation and after a
short SGD run) whose dense Hessian ``jax.hessian`` can form, for a budget of ``m`` products:

- top-5 eigenvalues: ``sharpness.top_eigenvalues`` vs matfree's
  ``eig.eigh_partial(decomp.tridiag_sym(m))`` (full reorthogonalisation in both);
- spectral density (SLQ, 4 probes × m/4 steps): ``sharpness.spectral_density`` vs the same
  broadening of matfree's ``tridiag_sym`` nodes and weights; error = L1 distance to the dense
  eigenvalues broadened with the same σ, on the same grid;
- trace: Hutchinson and Hutch++ (``sharpness.hessian_trace``) vs matfree's Hutchinson
  (``monte_carlo_trace``, Rademacher), XTrace (``leave_one_out_xtrace``, m/2 Gaussian samples:
  it spends 2 products per sample) and, on the positive semi-definite GGN, XNysTrace
  (``leave_one_out_xnystrace``, m samples, one product each). Error: mean over ``--keys``
  seeds of |estimate − exact| / exact.

Every estimator is one jitted function of the params and a key, with the data as arguments,
and the same HVP (``sharpness.hvp``'s forward-over-reverse). Timing: compile = first call −
steady state; steady state = median over ``--repeats`` interleaved rounds (one call of each
method per round), so load on the shared machine hits all methods alike.

    pip install "matfree==0.6.*"   # not a sharpjax dependency: only this benchmark uses it
    python -m experiments.benchmarks --only matfree --set keys=3 --repeats 5
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from benchmarks import harness
from benchmarks.measures import eigenvalues_of
from sharpjax import sharpness
from sharpjax.models import MLP, LeNet
from sharpjax.sharpness.curvature import Operator

K = 5  # eigenvalues compared
PROBES = 4  # SLQ probes


def digits(n: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images[:n, :, :, None] / 16.0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(data.target[:n].astype(np.int32))


def train(model, params, x, y, steps: int):
    loss = sharpness.SoftmaxCrossEntropy(lambda p, x: model.apply({"params": p}, x))
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p, (x, y))
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def broadened(nodes, weights, grid, sigma):
    g = np.exp(-0.5 * ((grid[:, None] - nodes.ravel()[None]) / sigma) ** 2)
    return g @ weights.ravel() / (sigma * np.sqrt(2 * np.pi))


def methods(logits_fn, params, m: int) -> dict[str, Callable]:
    """name -> jitted ``f(params, key, x, y)``; each spends ``m`` matrix-vector products."""
    from matfree import decomp, eig, stochtrace  # not a dependency: only this benchmark uses it

    ce = sharpness.SoftmaxCrossEntropy(logits_fn)
    flat0 = ravel_pytree(params)[0]
    d = flat0.size

    def flat_product(operator, loss, p):
        # Operators take a stack of probes shaped like the params; matfree wants flat vectors.
        unravel = ravel_pytree(p)[1]
        stack = lambda v: jax.tree.map(lambda a: a[None], unravel(v))
        return lambda v: ravel_pytree(operator(loss, p, stack(v)))[0]

    def hvp_flat(p, x, y):
        return flat_product(Operator("hessian"), lambda q: ce(q, (x, y)), p)

    def ggn_flat(p, x, y):
        from sharpjax.sharpness._batches import BatchLoss

        return flat_product(Operator("ggn"), BatchLoss(ce, (x, y)), p)

    out = {}
    out["eig/sharpjax"] = lambda p, k, x, y: eigenvalues_of(
        sharpness.top_eigenvalues(lambda q: ce(q, (x, y)), p, k, K, m)
    )

    def eig_matfree(p, k, x, y):
        v0 = jax.random.normal(k, (d,), flat0.dtype)
        vals, _ = eig.eigh_partial(decomp.tridiag_sym(m))(hvp_flat(p, x, y), v0)
        return jnp.sort(vals)[::-1][:K]

    out["eig/matfree"] = eig_matfree
    steps = m // PROBES

    def slq_sharpjax(p, k, x, y):
        return sharpness.spectral_density(
            lambda q: ce(q, (x, y)), p, k, steps, PROBES, grid=GRID[0], sigma=GRID[1]
        )[1]

    def slq_matfree(p, k, x, y):
        tridiag = decomp.tridiag_sym(steps)
        mv = hvp_flat(p, x, y)

        def one(v0):
            _, T, *_ = tridiag(mv, v0)
            theta, Y = jnp.linalg.eigh(T)
            return theta, Y[0] ** 2

        theta, w = jax.vmap(one)(jax.random.normal(k, (PROBES, d), flat0.dtype))
        g = jnp.exp(-0.5 * ((GRID[0][:, None] - theta.ravel()[None]) / GRID[1]) ** 2)
        return g @ w.ravel() / (PROBES * GRID[1] * jnp.sqrt(2 * jnp.pi))

    out["slq/sharpjax"], out["slq/matfree"] = slq_sharpjax, slq_matfree
    for method in ("hutchinson", "hutch++"):
        out[f"trace/sharpjax {method}"] = lambda p, k, x, y, method=method: (
            sharpness.hessian_trace(lambda q: ce(q, (x, y)), p, k, m, method).value
        )
    like = jnp.zeros(d, flat0.dtype)
    hutch = stochtrace.estimator_monte_carlo(
        stochtrace.monte_carlo_trace(), stochtrace.sampler_signs(like, num=m)
    )
    xtrace = stochtrace.estimator_leave_one_out(
        stochtrace.leave_one_out_xtrace(), stochtrace.sampler_normal(like, num=m // 2)
    )
    out["trace/matfree hutchinson"] = lambda p, k, x, y: hutch(hvp_flat(p, x, y), k)
    out["trace/matfree xtrace"] = lambda p, k, x, y: xtrace(hvp_flat(p, x, y), k)
    # GGN (positive semi-definite): where XNysTrace applies.
    out["ggn trace/sharpjax hutch++"] = lambda p, k, x, y: (
        sharpness.hessian_trace(ce, p, k, m, "hutch++", curvature="ggn", batches=[(x, y)]).value
    )
    xnys = stochtrace.estimator_leave_one_out(
        stochtrace.leave_one_out_xnystrace(), stochtrace.sampler_normal(like, num=m)
    )
    out["ggn trace/matfree xtrace"] = lambda p, k, x, y: xtrace(ggn_flat(p, x, y), k)
    out["ggn trace/matfree xnystrace"] = lambda p, k, x, y: xnys(ggn_flat(p, x, y), k)
    return {name: jax.jit(f) for name, f in out.items()}


GRID: tuple = ()


def bench_network(name, model, x, y, args) -> dict:
    global GRID
    params0 = model.init(jax.random.key(0), x[:1])["params"]
    logits_fn = lambda p, inputs: model.apply({"params": p}, inputs)
    ce = sharpness.SoftmaxCrossEntropy(logits_fn)
    rows = {}
    for state, steps in (("init", 0), ("trained", args.train_steps)):
        params = train(model, params0, x, y, steps) if steps else params0
        flat, unravel = ravel_pytree(params)
        H = np.asarray(
            jax.jit(jax.hessian(lambda w, u=unravel: ce(u(w), (x, y))))(flat), np.float64
        )
        lam = np.linalg.eigvalsh((H + H.T) / 2)
        J = jax.jit(jax.jacfwd(lambda w, u=unravel: logits_fn(u(w), x)))(flat)
        p = jax.nn.softmax(logits_fn(params, x))
        ggn_trace = float(
            jnp.sum(p[:, :, None] * J**2) / x.shape[0]
            - jnp.sum(jnp.einsum("nk,nkd->nd", p, J) ** 2) / x.shape[0]
        )
        sigma = 0.01 * (lam[-1] - lam[0])
        grid = jnp.linspace(lam[0] - 6 * sigma, lam[-1] + 6 * sigma, 2000)
        GRID = (grid, sigma)
        dense_density = broadened(lam, np.full(lam.size, 1 / lam.size), np.asarray(grid), sigma)
        exact = {"eig": lam[::-1][:K], "trace": lam.sum(), "ggn trace": ggn_trace}
        for m in args.budgets:
            fns = methods(logits_fn, params, m)
            keys = [jax.random.key(100 + i) for i in range(args.keys)]
            compile_s, outs = {}, {}
            for nm, f in fns.items():
                t0 = time.perf_counter()
                outs[nm] = [jax.block_until_ready(f(params, keys[0], x, y))]
                compile_s[nm] = time.perf_counter() - t0
            calls = {nm: functools.partial(f, params, keys[0], x, y) for nm, f in fns.items()}
            times, loads = harness.interleaved(calls, args.rounds, window=1, warmup=0)
            LOADS.extend(loads)
            for nm, f in fns.items():
                outs[nm] += [f(params, k, x, y) for k in keys[1:]]
            for nm in fns:
                kind = nm.split("/")[0]
                vals = [np.asarray(o, np.float64) for o in outs[nm]]
                if kind == "eig":
                    err = np.mean(
                        [np.max(np.abs(v - exact["eig"]) / np.abs(exact["eig"])) for v in vals]
                    )
                elif kind == "slq":
                    dx = float(grid[1] - grid[0])
                    err = np.mean([np.sum(np.abs(v - dense_density)) * dx for v in vals])
                else:
                    err = np.mean([abs(float(v) - exact[kind]) / abs(exact[kind]) for v in vals])
                median = float(np.median(times[nm]))
                rows[f"{name} {state} m={m} {nm}"] = {
                    "model": name,
                    "state": state,
                    "budget": m,
                    "method": nm,
                    "params": int(flat.size),
                    "error": float(err),
                    "median_s": median,
                    "compile_s": compile_s[nm] - median,
                }
                print(
                    f"{name:6s} {state:7s} m={m:3d} {nm:30s} error {err:9.2e}  "
                    f"time {median * 1e3:8.2f} ms  compile {compile_s[nm] - median:6.2f} s",
                    flush=True,
                )
    return rows


TITLE = "sharpjax's Lanczos, SLQ and trace estimators against matfree 0.6, same budget"
DEFAULTS: dict[str, Any] = {
    "examples": 256,
    "budgets": [40, 120],
    "keys": 5,  # seeds averaged for the errors
    "rounds": 7,
    "train_steps": 300,
    "models": ["mlp", "lenet"],
}
QUICK: dict[str, Any] = {
    "examples": 32,
    "budgets": [8],
    "keys": 1,
    "rounds": 1,
    "train_steps": 2,
    "models": ["mlp"],
}
LOADS: list[float] = []


def run(config: dict[str, Any]) -> harness.Record:
    args = SimpleNamespace(**config)
    record = harness.new_record("matfree", TITLE, config)
    record["machine"]["matfree"] = version("matfree")
    x, y = digits(args.examples)
    nets = {
        "mlp": MLP(10, hidden_sizes=(32,)),
        "lenet": LeNet(10, features=(4, 8), hidden_sizes=(32,), kernel_size=3),
    }
    LOADS.clear()
    for name in args.models:
        for row_name, row in bench_network(name, nets[name], x, y, args).items():
            record["rows"].append({"name": row_name, **row})
    return harness.finish(record, LOADS)


def table(record: harness.Record) -> str:
    columns = [
        ("network, state, budget, method", lambda r: r["name"]),
        ("error", lambda r: f"{r['error']:.2e}"),
        ("time", lambda r: f"{1e3 * r['median_s']:.2f} ms"),
    ]
    return harness.table(record["rows"], columns)
