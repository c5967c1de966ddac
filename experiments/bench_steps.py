"""Step-time benchmark: SGD, sharpjax's SAM variants, the efficient variants and
optax.contrib.sam, interleaved.

Every optimizer gets the same jitted training step (clean value_and_grad, then tx.update with
grad_fn; ESAM gets per-example losses, Momentum-SAM replaces SGD) on the same model and the
same ``--batches`` random batches in turn. Windows of ``--window`` consecutive steps are timed
round-robin (a window of each optimizer, repeated), so that the shared machine's noise hits
every optimizer alike. The time per step is a window's mean, skipped second gradients included
(LookSAM's k = 5 and RST's draws average out over a window of 10); we report the median over
rounds and its ratio to SGD and to SAM (and the ratio of the means over windows, the summary to
read where the share of steps taking g₂ changes along the run, as AE-SAM's does). Per optimizer
we also report the compile time of the step, XLA's temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``) and, for the efficient variants, the share
of the timed steps that took the second gradient.

On XLA:CPU the efficient variants run without ``lax.cond``, since a conv gradient under it
runs as a naive loop on XLA:CPU (``experiments/bench_cond.py``): LookSAM and RST, whose policy
decides ahead, as ``sharpjax.efficient.planned_step`` (the decision read on the host before each
step, which runs one of two compiled programs, with or without the second gradient); AE-SAM,
whose decision needs this step's ‖g‖², as three programs (the clean gradient and the decision,
then one of the two updates). Their compile time is the programs' sum and their temporary
memory the largest. ``--cond`` adds each of them once more as ``<name>_cond``, with the
decision in the step under ``lax.cond`` (the generic path, and what every backend ran before),
interleaved with the rest.

    python experiments/bench_steps.py --repeats 30 --out results/benchmarks/steps.json
"""

from __future__ import annotations

import argparse
import functools
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
from sharpjax.efficient import plan_second_gradient, planned_step


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
    parallel = sharpjax.msam(rho, num_microbatches=8, microbatch_execution="parallel")
    table["msam_parallel"] = (optax.chain(parallel, base()), "msam")
    # The efficient variants, each with its defaults (AE-SAM: target fraction 0.5).
    efficient = {
        "looksam": sharpjax.looksam(rho),
        "random_sam": sharpjax.random_sam(rho),
        "ae_sam": sharpjax.ae_sam(rho),
        "saner_random_sam": sharpjax.random_sam(rho, combination=sharpjax.saner_combination()),
    }
    table.update({name: (optax.chain(tx, base()), "sharpjax") for name, tx in efficient.items()})
    table["esam"] = (optax.chain(sharpjax.esam(rho), base()), "esam")
    table["momentum_sam"] = (sharpjax.momentum_sam(lr, 0.9), "plain")
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    table["optax_contrib_sam"] = (
        optax.contrib.sam(base(), adversary, opaque_mode=True),
        "optax",
    )
    return table


def losses(model):
    """``(example_losses, loss_fn)`` of the model: per-example and mean cross-entropy."""

    def example_losses(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return example_losses, lambda params, x, y: example_losses(params, x, y).mean()


def make_split_step(model, tx, params, state, x, y):
    """AE-SAM's step on CPU: the clean gradient and the decision (read on the host), then one
    of two update programs, with or without the second gradient. Returns the host-side step,
    the three programs' compile time and their largest temporary memory."""
    _, loss_fn = losses(model)

    def clean(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return loss, grads, plan_second_gradient(state, grads)

    def update(params, state, x, y, grads, second_gradient):
        grad_fn = lambda p: jax.grad(loss_fn)(p, x, y)
        updates, state = tx.update(
            grads, state, params, grad_fn=grad_fn, second_gradient=second_gradient
        )
        return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    clean = jax.jit(clean).lower(params, state, x, y).compile()
    grads = clean(params, state, x, y)[1]
    updates = {
        d: jax.jit(functools.partial(update, second_gradient=d), donate_argnums=(0, 1))
        .lower(params, state, x, y, grads)
        .compile()
        for d in (True, False)
    }
    seconds = time.perf_counter() - start
    temps = [c.memory_analysis() for c in (clean, *updates.values())]
    temps = [None if t is None else int(t.temp_size_in_bytes) for t in temps]

    def step(params, state, x, y):
        loss, grads, decision = clean(params, state, x, y)
        params, state = updates[bool(decision)](params, state, x, y, grads)
        return params, state, loss

    return step, seconds, None if None in temps else max(temps)


def make_step(model, tx, kind, num_microbatches=8, second_gradient=None):
    planned = {} if second_gradient is None else {"second_gradient": second_gradient}
    example_losses, loss_fn = losses(model)

    def step(params, state, x, y):
        if kind == "msam":
            batch_loss = lambda p, batch: loss_fn(p, *batch)
            losses, grads, grad_fn = sharpjax.microbatch_value_and_grad(
                batch_loss, params, (x, y), num_microbatches
            )
            loss = losses.mean()
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        elif kind == "esam":
            # The clean per-example losses come with the clean gradient (no extra forward).
            def mean_and_rows(p):
                rows = example_losses(p, x, y)
                return rows.mean(), rows

            (loss, rows), grads = jax.value_and_grad(mean_and_rows, has_aux=True)(params)

            def example_loss_fn(p, indices=None):
                if indices is None:
                    return example_losses(p, x, y)
                return example_losses(p, x[indices], y[indices])

            updates, state = tx.update(
                grads, state, params, example_loss_fn=example_loss_fn, example_losses=rows
            )
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            if kind == "plain":
                updates, state = tx.update(grads, state, params)
            elif kind == "optax":
                grad_fn = lambda p, _: jax.grad(loss_fn)(p, x, y)
                updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
            else:
                grad_fn = lambda p: jax.grad(loss_fn)(p, x, y)
                updates, state = tx.update(grads, state, params, grad_fn=grad_fn, **planned)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def compile_step(jitted, params, state, x, y):
    """The compiled step, its compile time (lower + compile) and XLA's temporary bytes."""
    start = time.perf_counter()
    compiled = jitted.lower(params, state, x, y).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = None if memory is None else int(memory.temp_size_in_bytes)
    return compiled, seconds, temp


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--window", type=int, default=10, help="consecutive steps per window")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, in turn")
    parser.add_argument("--only", nargs="*", default=None, help="subset of optimizer names")
    parser.add_argument(
        "--cond",
        action="store_true",
        help="also run the efficient variants decided on the host under lax.cond, as <name>_cond",
    )
    parser.add_argument("--out", default="results/benchmarks/steps.json")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    # Distinct batches in turn, so that ‖g‖² varies from step to step as in training (AE-SAM
    # decides from it; on one fixed batch it would fall steadily and AE-SAM rarely take g₂).
    data = [
        (
            jnp.asarray(rng.normal(size=(args.batch_size, 8, 8, 1)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, size=args.batch_size), jnp.int32),
        )
        for _ in range(args.batches)
    ]
    x, y = data[0]
    model = BenchCNN(args.width)
    params0 = model.init(jax.random.key(0), x[:1])["params"]

    table = optimizers(lr=0.05, rho=0.05)
    if args.only:
        table = {k: v for k, v in table.items() if k in set(args.only) | {"sgd", "sam"}}
    cpu = jax.default_backend() == "cpu"
    if args.cond:
        table.update(
            {
                f"{name}_cond": (tx, "cond")
                for name, (tx, kind) in list(table.items())
                if kind == "sharpjax"
                and plan_second_gradient(tx.init(params0), jax.tree.map(jnp.zeros_like, params0))
                is not None
            }
        )
    runs, compile_seconds, temp_bytes, planned = {}, {}, {}, []
    for name, (tx, kind) in table.items():
        params = jax.tree.map(jnp.copy, params0)
        # Copies: a state may share one buffer between leaves, which donation refuses.
        state = jax.tree.map(jnp.copy, tx.init(params))
        kind = "sharpjax" if kind == "cond" else kind
        plannable = cpu and kind == "sharpjax" and not name.endswith("_cond")
        if plannable and plan_second_gradient(state) is not None:
            # One program per decision, chosen on the host before each step.
            both = {
                d: compile_step(make_step(model, tx, kind, second_gradient=d), params, state, x, y)
                for d in (True, False)
            }
            compile_seconds[name] = sum(c[1] for c in both.values())
            temps = [c[2] for c in both.values()]
            temp_bytes[name] = None if None in temps else max(temps)
            step = planned_step(lambda d, both=both: both[d][0], lambda p, s, *_: s)
            runs[name] = [step, params, state]
            planned.append(name)
            continue
        zeros = jax.tree.map(jnp.zeros_like, params)
        if plannable and plan_second_gradient(state, zeros) is not None:
            # The decision needs this step's ‖g‖² (AE-SAM): three programs.
            step, compile_seconds[name], temp_bytes[name] = make_split_step(
                model, tx, params, state, x, y
            )
            runs[name] = [step, params, state]
            planned.append(name)
            continue
        step, compile_seconds[name], temp_bytes[name] = compile_step(
            make_step(model, tx, kind), params, state, x, y
        )
        runs[name] = [step, params, state]

    def call(name):
        step, params, state = runs[name]
        start = time.perf_counter()
        for i in range(args.window):
            params, state, loss = step(params, state, *data[i % len(data)])
        jax.block_until_ready((params, state, loss))
        runs[name][1:] = [params, state]
        return (time.perf_counter() - start) / args.window

    def second_gradients(name):
        """How many steps so far took the second gradient (None: not an efficient variant)."""
        fraction = sharpjax.diagnostics(runs[name][2]).get("second_gradient_fraction")
        return None if fraction is None else float(fraction) * steps_run[name]

    steps_run = dict.fromkeys(runs, 0)
    for _ in range(args.warmup):
        for name in runs:
            call(name)
            steps_run[name] += args.window
    before = {name: second_gradients(name) for name in runs}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:  # interleaved: one step of each, round-robin
            times[name].append(call(name))
            steps_run[name] += args.window

    medians = {name: float(np.median(t)) for name, t in times.items()}
    # The efficient variants' share of the timed steps that took the second gradient (AE-SAM's
    # changes along the run, so the warm-up's would mislead).
    fractions = {
        name: round((second_gradients(name) - before[name]) / (args.repeats * args.window), 4)
        for name in runs
        if before[name] is not None
    }
    result = {
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "window": args.window,
        "load_average": os.getloadavg(),
        "planned_on_host": planned,
        "median_seconds": medians,
        "compile_seconds": compile_seconds,
        "temp_bytes": temp_bytes,
        "second_gradient_fraction": fractions,
        "ratio_to_sgd": {n: medians[n] / medians["sgd"] for n in medians},
        # The mean over windows: the right summary where the g₂ share changes from window to
        # window (AE-SAM), since the median window then sits at another share than the mean.
        "mean_ratio_to_sgd": {n: float(np.mean(times[n]) / np.mean(times["sgd"])) for n in times},
        "ratio_to_sam": {n: medians[n] / medians["sam"] for n in medians},
    }
    print(
        f"device: {result['device']}, batch {args.batch_size}, {args.repeats} interleaved "
        f"rounds of {args.window}-step windows, load average {result['load_average']}; "
        f"decided on the host: {', '.join(planned) or 'none'}"
    )
    print(
        f"{'optimizer':22s} {'ms/step':>9s} {'/ sgd':>7s} {'/ sam':>7s} {'compile s':>10s} "
        f"{'temp MiB':>9s} {'g2 share':>8s} {'mean / sgd':>10s}"
    )
    for name in medians:
        temp = temp_bytes[name]
        print(
            f"{name:22s} {1e3 * medians[name]:9.2f} {result['ratio_to_sgd'][name]:7.3f} "
            f"{result['ratio_to_sam'][name]:7.3f} {compile_seconds[name]:10.2f} "
            f"{'n/a' if temp is None else f'{temp / 2**20:.2f}':>9s} "
            f"{f'{fractions[name]:.2f}' if name in fractions else '':>8s} "
            f"{result['mean_ratio_to_sgd'][name]:10.3f}"
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
