"""Minimal reproducer: a conv gradient inside ``lax.cond`` versus outside it, on XLA:CPU.

The model and batch are those of ``bench_steps.py`` (width-64 CNN on 8x8 inputs, batch 256).
Each variant is one jitted function of ``(params, take)`` that returns the gradient (or
zeros); windows of ``--window`` calls are timed round-robin over the variants and we report
medians and ratios to ``plain`` (the gradient with no cond):

* ``plain``: ``value_and_grad`` alone;
* ``cond_traced``: under ``lax.cond(take, ...)`` with ``take`` a traced argument (True);
* ``cond_const``: under ``lax.cond(True, ...)`` (a constant predicate XLA can fold away);
* ``cond_operands``: traced predicate, the params passed as the cond's operand instead of
  closed over;
* ``cond_skip``: traced predicate False (the branch without the gradient);
* ``scan_halves``: the same gradient as two half-batch gradients in a ``lax.scan`` (a
  while loop: another nested computation).

With ``--hlo`` it prints, for each variant, what the optimized HLO holds: the convolutions
(and which of them are oneDNN custom calls) in the entry computation and in the branch
computations, and the copies and transposes.

    python experiments/bench_cond.py --repeats 10
    XLA_FLAGS=--xla_cpu_use_thunk_runtime=false python experiments/bench_cond.py
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_steps import BenchCNN  # the same model as the step benchmark


def variants(model, x, y):
    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad = jax.value_and_grad(loss_fn)

    def zeros(p):
        return jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, p)

    def plain(p, take):
        del take
        return grad(p)

    def cond_traced(p, take):
        return jax.lax.cond(take, lambda _: grad(p), lambda _: zeros(p), None)

    def cond_const(p, take):
        del take
        return jax.lax.cond(True, lambda _: grad(p), lambda _: zeros(p), None)

    def cond_operands(p, take):
        return jax.lax.cond(take, grad, zeros, p)

    def halves_loss(p, xs, ys):
        logits = model.apply({"params": p}, xs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    def scan_halves(p, take):  # the same work as `plain`, in a while loop of two iterations
        del take
        xs, ys = x.reshape(2, -1, *x.shape[1:]), y.reshape(2, -1)

        def body(acc, batch):
            out = jax.value_and_grad(halves_loss)(p, *batch)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--window", type=int, default=5, help="consecutive calls per window")
    parser.add_argument("--only", nargs="*", default=None, help="subset of variant names")
    parser.add_argument("--hlo", action="store_true", help="summarize the optimized HLO")
    parser.add_argument("--dump", default=None, help="write each variant's HLO to this folder")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch_size, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=args.batch_size), jnp.int32)
    model = BenchCNN(args.width)
    params = model.init(jax.random.key(0), x[:1])["params"]

    table = variants(model, x, y)
    if args.only:
        table = {k: v for k, v in table.items() if k in set(args.only) | {"plain"}}
    compiled = {}
    for name, (fn, take) in table.items():
        take = jnp.asarray(take)
        exe = jax.jit(fn).lower(params, take).compile()
        compiled[name] = (exe, take)
        if args.hlo or args.dump:
            text = exe.as_text()
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                with open(os.path.join(args.dump, f"{name}.hlo.txt"), "w") as f:
                    f.write(text)
            if args.hlo:
                print(f"{name}: {hlo_summary(text)}")

    def call(name):
        exe, take = compiled[name]
        start = time.perf_counter()
        for _ in range(args.window):
            out = exe(params, take)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / args.window

    for name in compiled:  # warm-up round
        call(name)
    times = {name: [] for name in compiled}
    for _ in range(args.repeats):
        for name in compiled:
            times[name].append(call(name))
    base = float(np.median(times["plain"]))
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load {os.getloadavg()[0]:.2f}")
    print(f"{'variant':15s} {'ms/call':>9s} {'/ plain':>8s}")
    for name, t in times.items():
        med = float(np.median(t))
        print(f"{name:15s} {1e3 * med:9.2f} {med / base:8.2f}")


if __name__ == "__main__":
    main()
