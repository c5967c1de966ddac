"""Temporary memory of one jitted train step per optimizer, in parameter copies beyond SGD's.

Reads XLA's own accounting (``jax.jit(step).lower(...).compile().memory_analysis()``), so the
figures do not depend on the machine's load (the compile time, also stored, does). SGD with
momentum follows every transformation; a hand-written SAM step and ``optax.contrib.sam`` are
the floor to compare with. The cosine diagnostic is measured apart (``sam(cosine=True)``): it
keeps ``g`` alive through the second pass. The rows are per model: what a step keeps alive is
a property of the network (an MLP's activations are small beside its weights; a ResNet's are
not), so the table has a column per model.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
import optax.contrib

import sharpjax
from benchmarks import harness
from benchmarks.models import Problem, problem

TITLE = "XLA temporary memory of one train step, in parameter copies beyond SGD's step"
DEFAULTS: dict[str, Any] = {
    "models": ["mlp", "resnet18"],
    "batch_size": 128,
    "microbatches": [8, 32],
    "optimizers": None,  # None: all
}
QUICK: dict[str, Any] = {"models": ["tiny"], "batch_size": 16, "microbatches": [2]}


def steps(p: Problem, microbatches: list[int]) -> dict[str, tuple[Any, Any]]:
    """name -> (step(params, state, x, y), transformation)."""
    base = optax.sgd(0.1, momentum=0.9)
    loss = p.loss

    def plain(tx):
        def step(q, s, x, y):
            u, s = tx.update(jax.grad(loss)(q, x, y), s, q)
            return optax.apply_updates(q, u), s

        return step

    def hand_sam(q, s, x, y):
        g = jax.grad(loss)(q, x, y)
        scale = 0.05 / optax.global_norm(g)
        g2 = jax.grad(loss)(jax.tree.map(lambda w, d: w + scale * d, q, g), x, y)
        u, s = base.update(g2, s, q)
        return optax.apply_updates(q, u), s

    def two_gradient(tx):
        def step(q, s, x, y):
            g = jax.grad(loss)(q, x, y)
            u, s = tx.update(g, s, q, grad_fn=lambda r: jax.grad(loss)(r, x, y))
            return optax.apply_updates(q, u), s

        return step

    contrib = optax.contrib.sam(base, optax.sgd(0.05), opaque_mode=True)

    def contrib_step(q, s, x, y):
        u, s = contrib.update(
            jax.grad(loss)(q, x, y), s, q, grad_fn=lambda r, _: jax.grad(loss)(r, x, y)
        )
        return optax.apply_updates(q, u), s

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
        def step(q, s, x, y):
            _, g, grad_fn = sharpjax.microbatch_value_and_grad(
                lambda r, b: loss(r, *b), q, (x, y), m
            )
            u, s = tx.update(g, s, q, grad_fn=grad_fn)
            return optax.apply_updates(q, u), s

        return step

    for m in microbatches:
        for execution in ("sequential", "parallel"):
            tx = optax.chain(sharpjax.msam(0.05, m, microbatch_execution=execution), base)
            rows[f"msam m = {m}, {execution}"] = (micro_step(tx, m), tx)
    return rows


def run(config: dict[str, Any]) -> harness.Record:
    record = harness.new_record("memory", TITLE, config, reference="sgd")
    for model in config["models"]:
        p = problem(model, config["batch_size"], num_batches=1)
        x, y = p.batches[0]
        param_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(p.params))
        reference = None
        for name, (step, tx) in steps(p, config["microbatches"]).items():
            if config["optimizers"] and name not in set(config["optimizers"]) | {"sgd"}:
                continue
            state = tx.init(p.params)
            jitted = jax.jit(step, donate_argnums=(0, 1))
            _, seconds, temp = harness.compile_seconds(jitted, p.params, state, x, y)
            reference = temp if reference is None else reference
            row = {
                "name": name,
                "model": model,
                "temp_bytes": temp,
                "param_bytes": int(param_bytes),
                "copies_beyond_sgd": (temp - reference) / param_bytes,
                "compile_s": seconds,
            }
            record["rows"].append(row)
            print(f"{model:9s} {name:28s} {row['copies_beyond_sgd']:6.2f}", flush=True)
        harness.describe_model(record, model, p)
    return harness.finish(record)


def table(record: harness.Record) -> str:
    models = list(dict.fromkeys(r["model"] for r in record["rows"]))
    by = {(r["model"], r["name"]): r for r in record["rows"]}
    names = [n for n in dict.fromkeys(r["name"] for r in record["rows"]) if n != "sgd"]
    columns = [("step", lambda n: n)]
    for m in models:
        description = record.get("models", {}).get(m, {})
        params = f", {description['params'] / 1e6:.1f} M params" if description else ""
        columns.append(
            (
                f"{m}{params}",
                lambda n, m=m: harness.fmt(by.get((m, n), {}).get("copies_beyond_sgd")),
            )
        )
    return harness.table(names, columns)
