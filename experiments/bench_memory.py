"""Temporary memory and compile time of one jitted train step per optimizer.

Reads XLA's own accounting (``jax.jit(step).lower(...).compile().memory_analysis()``), so the
figures do not depend on the machine's load: the temporary bytes beyond SGD's step, in copies
of the parameters, and the compile time (this one does depend on load). The model is a ReLU MLP
(512-1024-1024-1024-10, 2.6 M params), batch 128, SGD with momentum after the transformation.
A hand-written SAM step and optax.contrib.sam are the floor to compare with. The cosine
diagnostic is measured separately (``sam(cosine=True)``): it keeps ``g`` alive through the
second pass.

    python experiments/bench_memory.py
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import optax
import optax.contrib

import sharpjax

SIZES = (512, 1024, 1024, 1024, 10)


def loss(params, x, y):
    h = x
    for i in range(len(SIZES) - 1):
        h = h @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"]
        if i < len(SIZES) - 2:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step (128)")
    parser.add_argument(
        "--microbatches",
        type=int,
        nargs="*",
        default=[8, 32],
        help="mSAM micro-batch counts, each with sequential and parallel execution (8 32)",
    )
    args = parser.parse_args()
    key = jax.random.key(0)
    params = {
        f"l{i}": {"w": 0.01 * jax.random.normal(key, (a, b)), "b": jnp.zeros(b)}
        for i, (a, b) in enumerate(itertools.pairwise(SIZES))
    }
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    x = jnp.ones((args.batch_size, SIZES[0]))
    y = jnp.zeros(args.batch_size, jnp.int32)
    base = optax.sgd(0.1, momentum=0.9)

    def plain(tx):
        def step(p, s, x, y):
            u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
            return optax.apply_updates(p, u), s

        return step

    def hand_sam(p, s, x, y):
        g = jax.grad(loss)(p, x, y)
        scale = 0.05 / optax.global_norm(g)
        g2 = jax.grad(loss)(jax.tree.map(lambda w, d: w + scale * d, p, g), x, y)
        u, s = base.update(g2, s, p)
        return optax.apply_updates(p, u), s

    def two_gradient(tx):
        def step(p, s, x, y):
            g = jax.grad(loss)(p, x, y)
            u, s = tx.update(g, s, p, grad_fn=lambda q: jax.grad(loss)(q, x, y))
            return optax.apply_updates(p, u), s

        return step

    contrib = optax.contrib.sam(base, optax.sgd(0.05), opaque_mode=True)

    def contrib_step(p, s, x, y):
        u, s = contrib.update(
            jax.grad(loss)(p, x, y), s, p, grad_fn=lambda q, _: jax.grad(loss)(q, x, y)
        )
        return optax.apply_updates(p, u), s

    rows = {"sgd": (plain(base), base), "hand-written sam": (hand_sam, base)}
    rows["optax.contrib.sam (opaque)"] = (contrib_step, contrib)
    for name, make in [
        ("sharpjax.sam", lambda: sharpjax.sam(0.05)),
        ("sharpjax.sam(cosine=True)", lambda: sharpjax.sam(0.05, cosine=True)),
        ("sharpjax.asam", lambda: sharpjax.asam(0.5)),
        ("sharpjax.vasso", lambda: sharpjax.vasso(0.05)),
        ("sharpjax.saner", lambda: sharpjax.saner(0.05)),
        ("sharpjax.gsam", lambda: sharpjax.gsam(0.05)),
        ("sharpjax.looksam", lambda: sharpjax.looksam(0.05)),
        ("sharpjax.random_sam", lambda: sharpjax.random_sam(0.05)),
    ]:
        tx = optax.chain(make(), base)
        rows[name] = (two_gradient(tx), tx)

    def micro_step(tx, m):
        def step(p, s, x, y):
            _, g, grad_fn = sharpjax.microbatch_value_and_grad(
                lambda q, b: loss(q, *b), p, (x, y), m
            )
            u, s = tx.update(g, s, p, grad_fn=grad_fn)
            return optax.apply_updates(p, u), s

        return step

    for m in args.microbatches:
        for execution in ("sequential", "parallel"):
            tx = optax.chain(sharpjax.msam(0.05, m, microbatch_execution=execution), base)
            rows[f"sharpjax.msam m={m} {execution}"] = (micro_step(tx, m), tx)

    reference = None
    print(f"{'optimizer':28s} {'temp beyond SGD (param copies)':>32s} {'compile (s)':>12s}")
    for name, (step, tx) in rows.items():
        state = tx.init(params)
        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x, y).compile()
        seconds = time.perf_counter() - start
        temp = compiled.memory_analysis().temp_size_in_bytes
        reference = temp if reference is None else reference
        print(f"{name:28s} {(temp - reference) / param_bytes:32.2f} {seconds:12.2f}")


if __name__ == "__main__":
    main()
