"""Step time of every optimizer against SGD and SAM, interleaved.

Every optimizer gets the same jitted training step (clean ``value_and_grad``, then
``tx.update`` with ``grad_fn``; ESAM gets per-example losses, Momentum-SAM replaces SGD, mSAM
splits the batch into micro-batches) on the same model and the same distinct batches in turn.
The harness times windows of ``window`` consecutive steps round-robin; a window's time per
step includes the skipped second gradients of the efficient variants (LookSAM's k = 5 and
RST's draws average out over a window of 10). Rows: the median time per step, its per-round
ratio to SGD (``ratio``) and to SAM (``ratio_sam``), the compile time, XLA's temporary bytes
and, for the efficient variants, the share of the timed steps that took the second gradient.

On XLA:CPU the efficient variants run without ``lax.cond`` (a convolution's gradient inside
it runs as a naive loop, see :mod:`benchmarks.cond`): LookSAM and RST, whose policy decides
ahead, through ``sharpjax.efficient.planned_step`` (decision read on the host, then one of two
programs); AE-SAM, whose decision needs this step's ‖g‖², as the split step (clean gradient
and decision, then one of two updates). Their compile time is the programs' sum and their
temporary memory the largest. ``cond=True`` adds each of them once more as ``<name>_cond``,
the decision inside the step under ``lax.cond``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.contrib

import sharpjax
from benchmarks import harness
from benchmarks.models import Problem, problem
from sharpjax.efficient import plan_second_gradient, planned_step

TITLE = "Step time per optimizer, interleaved, relative to SGD and to SAM"
DEFAULTS: dict[str, Any] = {
    "models": ["cnn8"],
    "batch_size": None,  # the model's default
    "optimizers": None,  # None: all; sgd and sam always run (the references)
    "microbatches": [8],
    "cond": False,
    "rounds": 10,
    "window": 10,
    "warmup": 2,
}
QUICK: dict[str, Any] = {
    "models": ["tiny"],
    "optimizers": ["sgd", "sam", "looksam"],
    "rounds": 2,
    "window": 2,
    "warmup": 1,
}
LABELS = {
    "sgd": "SGD (momentum 0.9)",
    "sam": "sharpjax.sam",
    "optax_contrib_sam": "optax.contrib.sam (opaque)",
    "asam": "asam",
    "vasso": "vasso",
    "saner": "saner",
    "saner_vasso": "saner on vasso",
    "gsam": "gsam",
    "noise_resistant_sam": "noise-resistant sam",
    "looksam": "LookSAM (k = 5), decided on the host",
    "random_sam": "RST (p = 0.5), decided on the host",
    "saner_random_sam": "SANER on RST, decided on the host",
    "ae_sam": "AE-SAM (target ½), split step",
    "esam": "ESAM (β = 0.6, γ = 0.5)",
    "momentum_sam": "Momentum-SAM (its own momentum)",
    "looksam_cond": "LookSAM under `lax.cond`",
    "random_sam_cond": "RST under `lax.cond`",
    "saner_random_sam_cond": "SANER on RST under `lax.cond`",
    "ae_sam_cond": "AE-SAM under `lax.cond`",
}


def label(name: str) -> str:
    if name.startswith("msam_m"):
        m, _, execution = name[len("msam_m") :].partition("_")
        how = '`"parallel"` (vmap)' if execution == "parallel" else '`"sequential"` (`lax.scan`)'
        return f"mSAM, m = {m}, {how}"
    return LABELS.get(name, name)


def optimizers(
    lr: float, rho: float, microbatches: list[int]
) -> dict[str, tuple[optax.GradientTransformation, str, int]]:
    """name -> (transformation, how the step calls it, micro-batches)."""
    base = lambda: optax.sgd(lr, momentum=0.9)
    chained = {
        "sam": sharpjax.sam(rho),
        "asam": sharpjax.asam(0.5),
        "vasso": sharpjax.vasso(rho),
        "saner": sharpjax.saner(rho),
        "saner_vasso": sharpjax.saner(rho, perturbation=sharpjax.vasso_perturbation()),
        "gsam": sharpjax.gsam(rho),
        "noise_resistant_sam": sharpjax.noise_resistant_sam(rho),
        "looksam": sharpjax.looksam(rho),
        "random_sam": sharpjax.random_sam(rho),
        "ae_sam": sharpjax.ae_sam(rho),
        "saner_random_sam": sharpjax.random_sam(rho, combination=sharpjax.saner_combination()),
    }
    table = {"sgd": (base(), "plain", 1)}
    table.update({name: (optax.chain(tx, base()), "grad_fn", 1) for name, tx in chained.items()})
    for m in microbatches:
        for execution in ("sequential", "parallel"):
            tx = sharpjax.msam(rho, num_microbatches=m, microbatch_execution=execution)
            suffix = "_parallel" if execution == "parallel" else ""
            table[f"msam_m{m}{suffix}"] = (optax.chain(tx, base()), "msam", m)
    table["esam"] = (optax.chain(sharpjax.esam(rho), base()), "esam", 1)
    table["momentum_sam"] = (sharpjax.momentum_sam(lr, 0.9), "plain", 1)
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    table["optax_contrib_sam"] = (
        optax.contrib.sam(base(), adversary, opaque_mode=True),
        "optax",
        1,
    )
    return table


def make_step(p: Problem, tx, kind: str, num_microbatches: int = 1, second_gradient=None):
    """The jitted ``(params, state, x, y) -> (params, state, loss)`` of one optimizer."""
    planned = {} if second_gradient is None else {"second_gradient": second_gradient}

    def step(params, state, x, y):
        if kind == "msam":
            losses, grads, grad_fn = sharpjax.microbatch_value_and_grad(
                lambda q, batch: p.loss(q, *batch), params, (x, y), num_microbatches
            )
            loss = losses.mean()
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        elif kind == "esam":
            # The clean per-example losses come with the clean gradient (no extra forward).
            def mean_and_rows(q):
                rows = p.example_losses(q, x, y)
                return rows.mean(), rows

            (loss, rows), grads = jax.value_and_grad(mean_and_rows, has_aux=True)(params)

            def example_loss_fn(q, indices=None):
                if indices is None:
                    return p.example_losses(q, x, y)
                return p.example_losses(q, x[indices], y[indices])

            updates, state = tx.update(
                grads, state, params, example_loss_fn=example_loss_fn, example_losses=rows
            )
        else:
            loss, grads = jax.value_and_grad(p.loss)(params, x, y)
            if kind == "plain":
                updates, state = tx.update(grads, state, params)
            elif kind == "optax":
                grad_fn = lambda q, _: jax.grad(p.loss)(q, x, y)
                updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
            else:
                grad_fn = lambda q: jax.grad(p.loss)(q, x, y)
                updates, state = tx.update(grads, state, params, grad_fn=grad_fn, **planned)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_split_step(p: Problem, tx, params, state, decision: str = "use"):
    """AE-SAM's step without ``lax.cond``: the clean gradient and the decision (one program),
    then one of two update programs. ``decision="use"`` reads the decision on the host and
    runs the update it names; for the round-trip benchmark, ``"read"`` reads it and runs the
    update without g₂ regardless, ``"none"`` runs that update without reading anything.
    Returns the host-side step, the programs' compile time and their largest temporary
    memory."""
    x, y = p.batches[0]
    mode = decision
    if mode not in ("use", "read", "none"):
        raise ValueError(f"make_split_step: decision must be use, read or none, got {mode!r}")

    def clean(params, state, x, y):
        loss, grads = jax.value_and_grad(p.loss)(params, x, y)
        return loss, grads, plan_second_gradient(state, grads)

    def update(params, state, x, y, grads, second_gradient):
        grad_fn = lambda q: jax.grad(p.loss)(q, x, y)
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
        take = False
        if mode != "none":
            take = bool(decision) and mode == "use"  # bool(): waits for the device
        params, state = updates[take](params, state, x, y, grads)
        return params, state, loss

    return step, seconds, None if None in temps else max(temps)


class Runner:
    """One optimizer's training run, advanced one step per call (for the harness)."""

    def __init__(self, step, params, state, batches):
        self.step, self.params, self.state, self.batches = step, params, state, batches
        self.count = 0

    def __call__(self):
        x, y = self.batches[self.count % len(self.batches)]
        self.params, self.state, loss = self.step(self.params, self.state, x, y)
        self.count += 1
        return loss, self.params

    def second_gradients(self) -> float | None:
        """Steps so far that took g₂ (None: not an efficient variant)."""
        fraction = sharpjax.diagnostics(self.state).get("second_gradient_fraction")
        return None if fraction is None else float(fraction) * self.count


def fresh(tx, params):
    # Copies: a state may share one buffer between leaves, which donation refuses.
    params = jax.tree.map(jnp.copy, params)
    return params, jax.tree.map(jnp.copy, tx.init(params))


def build(p: Problem, config: dict[str, Any]) -> tuple[dict[str, Runner], dict[str, dict]]:
    """The runners of the chosen optimizers on problem ``p`` and their compile facts."""
    table = optimizers(0.05, 0.05, config["microbatches"])
    if config["optimizers"]:
        unknown = set(config["optimizers"]) - set(table) - {f"{n}_cond" for n in table}
        if unknown:
            raise ValueError(
                f"steps: unknown optimizers {sorted(unknown)}; choose from {sorted(table)} "
                "(or <efficient variant>_cond)"
            )
        wanted = set(config["optimizers"]) | {"sgd", "sam"}
    else:
        wanted = set(table)
    cpu = jax.default_backend() == "cpu"
    zeros = jax.tree.map(jnp.zeros_like, p.params)
    x, y = p.batches[0]
    runners, facts = {}, {}
    for name, (tx, kind, m) in table.items():
        forms = [name] if name in wanted else []
        decides_ahead = plan_second_gradient(tx.init(p.params)) is not None
        decides_on_g = plan_second_gradient(tx.init(p.params), zeros) is not None
        if (decides_ahead or decides_on_g) and (config["cond"] or f"{name}_cond" in wanted):
            forms.append(f"{name}_cond")
        for form in forms:
            params, state = fresh(tx, p.params)
            if cpu and form == name and decides_ahead:
                both = {
                    d: harness.compile_seconds(
                        make_step(p, tx, kind, second_gradient=d), params, state, x, y
                    )
                    for d in (True, False)
                }
                step = planned_step(lambda d, both=both: both[d][0], lambda q, s, *_: s)
                seconds = sum(c[1] for c in both.values())
                temps = [c[2] for c in both.values()]
                temp = None if None in temps else max(temps)
                how = "planned on the host (two programs)"
            elif cpu and form == name and decides_on_g:
                step, seconds, temp = make_split_step(p, tx, params, state)
                how = "split step (three programs)"
            else:
                step, seconds, temp = harness.compile_seconds(
                    make_step(p, tx, kind, m), params, state, x, y
                )
                how = "lax.cond in the step" if form.endswith("_cond") else "one program"
            runners[form] = Runner(step, params, state, p.batches)
            facts[form] = {"compile_s": seconds, "temp_bytes": temp, "form": how}
    return runners, facts


def run(config: dict[str, Any]) -> harness.Record:
    record = harness.new_record("steps", TITLE, config, reference="sgd")
    all_loads = []
    for model in config["models"]:
        p = problem(model, config["batch_size"])
        runners, facts = build(p, config)
        for _ in range(config["warmup"]):  # the harness warms up too; this counts g₂ steps
            for r in runners.values():
                harness.block(r())
        before = {name: r.second_gradients() for name, r in runners.items()}
        start_count = {name: r.count for name, r in runners.items()}
        times, loads = harness.interleaved(runners, config["rounds"], config["window"], warmup=0)
        all_loads += loads
        for name, r in runners.items():
            taken = r.second_gradients()
            if taken is not None:
                facts[name]["g2_share"] = (taken - before[name]) / (r.count - start_count[name])
        rows = harness.timing_rows(times, "sgd", facts)
        for row in rows:
            row["ratio_sam"] = harness.ratio_summary(times[row["name"]], times["sam"])
            row["model"] = model
            row["label"] = label(row["name"])
        record["rows"] += rows
        harness.describe_model(record, model, p)
        print(table(record, model), flush=True)
    return harness.finish(record, all_loads)


def table(record: harness.Record, model: str | None = None) -> str:
    """The README's step-time table: per optimizer, ratio to SGD and to SAM, g₂ share; one
    ratio column pair per model when the record holds several. ``record["superseded"]``
    (name -> note) strikes the rows that a later run did not reproduce."""
    models = [model] if model else list(dict.fromkeys(r.get("model", "") for r in record["rows"]))
    by_model = {
        m: {r["name"]: r for r in record["rows"] if r.get("model", "") == m} for m in models
    }
    names = list(dict.fromkeys(r["name"] for r in record["rows"] if r.get("model", "") in models))
    names = [n for n in names if n != "sgd"]
    # Rows a later run contradicted: struck through, with where to read the new numbers.
    superseded = record.get("superseded", {})

    def cell(n, m, key):
        text = harness.ratio_cell(by_model[m].get(n, {}), key)
        return f"~~{text}~~" if text and n in superseded else text

    columns = [
        ("optimizer", lambda n: label(n) + (f" ({superseded[n]})" if n in superseded else ""))
    ]
    for m in models:
        tag = f" ({m})" if len(models) > 1 else ""
        columns += [
            (f"/ SGD{tag}", lambda n, m=m: cell(n, m, "ratio")),
            (f"/ SAM{tag}", lambda n, m=m: cell(n, m, "ratio_sam")),
        ]
    share = lambda n: next(
        (
            harness.fmt(100 * by_model[m][n]["g2_share"], 0, " %")
            for m in models
            if by_model[m].get(n, {}).get("g2_share") is not None
        ),
        "",
    )
    if any(share(n) for n in names):
        columns.append(("g₂ share", share))
    return harness.table(names, columns)
