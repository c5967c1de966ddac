"""A convolution's gradient inside ``lax.cond`` or a loop body against the same gradient
outside, on XLA:CPU (the minimal reproducer behind the planned and split steps).

XLA:CPU rewrites convolutions into its fast (Eigen) form only in a program's entry computation
(``conv_canonicalization.cc``), so a convolution's gradient in a ``lax.cond`` branch or a
``lax.scan`` body can run as a naive loop. How much that costs depends on the convolution's
shape: the rows are per model. Each variant is one jitted ``(params, take) -> (loss, grads)``;
the ratios are to ``plain``:

* ``plain``: ``value_and_grad`` alone;
* ``cond_traced``: under ``lax.cond(take, ...)``, ``take`` a traced argument (True);
* ``cond_const``: under ``lax.cond(True, ...)`` (a constant predicate XLA folds away);
* ``cond_operands``: traced predicate, the params passed as the cond's operand;
* ``cond_skip``: traced predicate False (the branch without the gradient);
* ``scan_halves``: the same gradient as two half-batch gradients in a ``lax.scan``.

``hlo=True`` stores, per variant, the convolutions, oneDNN calls, copies and transposes of
each computation of the optimized HLO.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.models import problem

TITLE = "A convolution's gradient under lax.cond / lax.scan against plain, on XLA:CPU"
DEFAULTS: dict[str, Any] = {
    "models": ["cnn8", "lenet28"],
    "batch_size": None,
    "rounds": 10,
    "window": 5,
    "warmup": 1,
    "hlo": False,
    "variants": None,  # None: all; "plain" always runs (the reference)
}
QUICK: dict[str, Any] = {"models": ["tiny"], "rounds": 2, "window": 1, "warmup": 1}
LABELS = {
    "plain": "gradient alone",
    "cond_traced": "under `lax.cond`, traced predicate",
    "cond_const": "under `lax.cond(True, …)`",
    "cond_operands": "under `lax.cond`, params as operand",
    "cond_skip": "`lax.cond` branch without the gradient",
    "scan_halves": "two half-batch gradients in `lax.scan`",
}


def variants(loss):
    grad = jax.value_and_grad(loss)

    def zeros(p):
        return jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, p)

    def plain(p, take, x, y):
        del take
        return grad(p, x, y)

    def cond_traced(p, take, x, y):
        return jax.lax.cond(take, lambda _: grad(p, x, y), lambda _: zeros(p), None)

    def cond_const(p, take, x, y):
        del take
        return jax.lax.cond(True, lambda _: grad(p, x, y), lambda _: zeros(p), None)

    def cond_operands(p, take, x, y):
        return jax.lax.cond(take, lambda q: grad(q, x, y), zeros, p)

    def scan_halves(p, take, x, y):  # the same work as `plain`, in a two-iteration loop
        del take
        xs, ys = x.reshape(2, -1, *x.shape[1:]), y.reshape(2, -1)

        def body(acc, batch):
            out = grad(p, *batch)
            return jax.tree.map(lambda a, b: a + b / 2, acc, out), None

        return jax.lax.scan(body, zeros(p), (xs, ys))[0]

    return {
        "plain": (plain, True),
        "cond_traced": (cond_traced, True),
        "cond_const": (cond_const, True),
        "cond_operands": (cond_operands, True),
        "cond_skip": (cond_traced, False),
        "scan_halves": (scan_halves, True),
    }


def hlo_summary(text: str) -> dict[str, dict[str, int]]:
    """Per computation of the optimized HLO: convolutions, oneDNN calls, copies, transposes."""
    summary, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = ("ENTRY " if head.group(1) else "") + head.group(2)
            summary[name] = {"convolution": 0, "onednn": 0, "copy": 0, "transpose": 0}
            continue
        if name is None:
            continue
        counts = summary[name]
        counts["convolution"] += len(re.findall(r"= \S+ convolution\(", line))
        counts["onednn"] += len(re.findall(r"onednn", line, re.IGNORECASE))
        counts["copy"] += len(re.findall(r"= \S+ copy\(", line))
        counts["transpose"] += len(re.findall(r"= \S+ transpose\(", line))
    return {k: v for k, v in summary.items() if any(v.values())}


def run(config: dict[str, Any]) -> harness.Record:
    record = harness.new_record("cond", TITLE, config, reference="plain")
    all_loads = []
    for model in config["models"]:
        p = problem(model, config["batch_size"], num_batches=1)
        x, y = p.batches[0]
        steps, extra = {}, {}
        for name, (fn, take) in variants(p.loss).items():
            if config["variants"] and name not in set(config["variants"]) | {"plain"}:
                continue
            take = jnp.asarray(take)
            exe, seconds, _ = harness.compile_seconds(jax.jit(fn), p.params, take, x, y)
            steps[name] = functools.partial(exe, p.params, take, x, y)
            extra[name] = {"compile_s": seconds, "model": model, "label": LABELS[name]}
            if config["hlo"]:
                extra[name]["hlo"] = hlo_summary(exe.as_text())
        times, loads = harness.interleaved(
            steps, config["rounds"], config["window"], config["warmup"]
        )
        all_loads += loads
        record["rows"] += harness.timing_rows(times, "plain", extra)
        harness.describe_model(record, model, p)
    print(table(record), flush=True)
    return harness.finish(record, all_loads)


def table(record: harness.Record) -> str:
    models = list(dict.fromkeys(r["model"] for r in record["rows"]))
    by = {(r["model"], r["name"]): r for r in record["rows"]}
    names = [n for n in LABELS if n != "plain" and any((m, n) in by for m in models)]
    columns = [("gradient", lambda n: LABELS[n])]
    for m in models:
        columns.append((f"/ plain ({m})", lambda n, m=m: harness.ratio_cell(by.get((m, n), {}))))
    return harness.table(names, columns)
