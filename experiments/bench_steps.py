"""Step-time benchmark: SGD, sharpjax's SAM variants and optax.contrib.sam, interleaved.

Every optimizer gets the same jitted training step (clean value_and_grad, then tx.update with
grad_fn) on the same model and batch. Steps are timed round-robin (one of each, repeated), so
that the shared machine's noise hits every optimizer alike; we report medians and ratios.

    python experiments/bench_steps.py --repeats 200 --out results/benchmarks/steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import sharpjax


class BenchCNN(nn.Module):
    """A LeNet-like CNN on 8x8 digits: big enough that compute, not dispatch, dominates."""

    width: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def optimizers(lr: float, rho: float) -> dict[str, tuple[optax.GradientTransformation, str]]:
    """name -> (transformation, kind); kind says how the step calls it."""
    base = lambda: optax.sgd(lr, momentum=0.9)
    sam_like = {
        "sam": sharpjax.sam(rho),
        "asam": sharpjax.asam(0.5),
        "vasso": sharpjax.vasso(rho),
        "saner": sharpjax.saner(rho),
        "saner_vasso": sharpjax.saner(rho, perturbation=sharpjax.vasso_perturbation()),
        "gsam": sharpjax.gsam(rho),
        "noise_resistant_sam": sharpjax.noise_resistant_sam(rho),
    }
    table = {"sgd": (base(), "plain")}
    table.update({name: (optax.chain(tx, base()), "sharpjax") for name, tx in sam_like.items()})
    table["msam"] = (optax.chain(sharpjax.msam(rho, num_microbatches=8), base()), "msam")
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    table["optax_contrib_sam"] = (
        optax.contrib.sam(base(), adversary, opaque_mode=True),
        "optax",
    )
    return table


def make_step(model, tx, kind, num_microbatches=8):
    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, state, x, y):
        if kind == "msam":
            batch_loss = lambda p, batch: loss_fn(p, *batch)
            losses, grads, grad_fn = sharpjax.microbatch_value_and_grad(
                batch_loss, params, (x, y), num_microbatches
            )
            loss = losses.mean()
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            if kind == "plain":
                updates, state = tx.update(grads, state, params)
            elif kind == "optax":
                grad_fn = lambda p, _: jax.grad(loss_fn)(p, x, y)
                updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
            else:
                grad_fn = lambda p: jax.grad(loss_fn)(p, x, y)
                updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None, help="subset of optimizer names")
    parser.add_argument("--out", default="results/benchmarks/steps.json")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch_size, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=args.batch_size), jnp.int32)
    model = BenchCNN(args.width)
    params0 = model.init(jax.random.key(0), x[:1])["params"]

    table = optimizers(lr=0.05, rho=0.05)
    if args.only:
        table = {k: v for k, v in table.items() if k in set(args.only) | {"sgd", "sam"}}
    runs = {}
    for name, (tx, kind) in table.items():
        params = jax.tree.map(jnp.copy, params0)
        runs[name] = [make_step(model, tx, kind), params, tx.init(params)]

    def call(name):
        step, params, state = runs[name]
        start = time.perf_counter()
        params, state, loss = step(params, state, x, y)
        jax.block_until_ready((params, state, loss))
        runs[name][1:] = [params, state]
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for name in runs:
            call(name)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:  # interleaved: one step of each, round-robin
            times[name].append(call(name))

    medians = {name: float(np.median(t)) for name, t in times.items()}
    result = {
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "median_seconds": medians,
        "ratio_to_sgd": {n: medians[n] / medians["sgd"] for n in medians},
        "ratio_to_sam": {n: medians[n] / medians["sam"] for n in medians},
    }
    print(f"device: {result['device']}, batch {args.batch_size}, {args.repeats} interleaved rounds")
    print(f"{'optimizer':22s} {'median ms':>10s} {'/ sgd':>7s} {'/ sam':>7s}")
    for name in medians:
        print(
            f"{name:22s} {1e3 * medians[name]:10.2f} {result['ratio_to_sgd'][name]:7.3f} "
            f"{result['ratio_to_sam'][name]:7.3f}"
        )
    if "optax_contrib_sam" in medians:
        ratio = medians["sam"] / medians["optax_contrib_sam"]
        print(f"sharpjax.sam / optax.contrib.sam = {ratio:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
