"""The host round trip of the planned and split steps, in SGD steps per step.

``sharpjax.efficient.planned_step`` reads the policy's decision on the host before each step
(LookSAM, RST), and AE-SAM's split step reads it between its clean program and its update: each
waits for the device, so the host cannot queue the next step while this one runs. To measure
that wait alone, every pair below runs the same programs with and without the read:

* ``sgd`` / ``sgd_read``: SGD, and SGD that reads its loss back (``float(loss)``) every step;
* ``planned_direct`` / ``planned``: LookSAM's program without g₂, called directly, and through
  ``planned_step`` (which reads the decision) always running that same program;
* ``split_direct`` / ``split``: AE-SAM's clean program then its update without g₂, and the same
  with the decision read in between (and discarded: the work stays the same).

The overhead of a pair is ``(t(with read) − t(without)) / t(SGD)`` per interleaved round:
the round trip's cost per step in SGD steps (median and quartiles over rounds).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks import harness, steps
from benchmarks.models import problem
from sharpjax.efficient import planned_step

TITLE = "Host round trip of the planned and split steps, in SGD steps per step"
DEFAULTS: dict[str, Any] = {
    "models": ["cnn8", "lenet28"],
    "batch_size": None,
    "rounds": 10,
    "window": 10,
    "warmup": 2,
}
QUICK: dict[str, Any] = {"models": ["tiny"], "rounds": 2, "window": 2, "warmup": 1}
PAIRS = {
    "sgd_read": ("sgd", "SGD reading its loss back every step"),
    "planned": ("planned_direct", "planned step (LookSAM's program without g₂)"),
    "split": ("split_direct", "AE-SAM's split step (its update without g₂)"),
}


def runners(model: str, batch_size: int | None) -> tuple[dict[str, Any], Any]:
    p = problem(model, batch_size)
    sgd = steps.optimizers(0.05, 0.05, [])["sgd"][0]
    out = {}
    params, state = steps.fresh(sgd, p.params)
    sgd_step = steps.make_step(p, sgd, "plain")
    out["sgd"] = steps.Runner(sgd_step, params, state, p.batches)

    class Reading(steps.Runner):
        def __call__(self):
            loss, params = super().__call__()
            float(loss)  # the device→host read of one scalar
            return loss, params

    params, state = steps.fresh(sgd, p.params)
    out["sgd_read"] = Reading(sgd_step, params, state, p.batches)

    looksam = steps.optimizers(0.05, 0.05, [])["looksam"][0]
    x, y = p.batches[0]
    params, state = steps.fresh(looksam, p.params)
    without = harness.compile_seconds(
        steps.make_step(p, looksam, "grad_fn", second_gradient=False), params, state, x, y
    )[0]
    out["planned_direct"] = steps.Runner(without, params, state, p.batches)
    params, state = steps.fresh(looksam, p.params)
    planned = planned_step(lambda d: without, lambda q, s, *_: s)
    out["planned"] = steps.Runner(planned, params, state, p.batches)

    ae_sam = steps.optimizers(0.05, 0.05, [])["ae_sam"][0]
    for name, decision in (("split_direct", "none"), ("split", "read")):
        params, state = steps.fresh(ae_sam, p.params)
        split, _, _ = steps.make_split_step(p, ae_sam, params, state, decision=decision)
        out[name] = steps.Runner(split, params, state, p.batches)
    return out, p


def run(config: dict[str, Any]) -> harness.Record:
    record = harness.new_record("roundtrip", TITLE, config, reference="sgd")
    all_loads = []
    for model in config["models"]:
        out, p = runners(model, config["batch_size"])
        times, loads = harness.interleaved(
            out, config["rounds"], config["window"], config["warmup"]
        )
        all_loads += loads
        rows = harness.timing_rows(times, "sgd")
        sgd = times["sgd"]
        for row in rows:
            row["model"] = model
            if row["name"] in PAIRS:
                base, text = PAIRS[row["name"]]
                diffs = [
                    (a - b) / s
                    for a, b, s in zip(times[row["name"]], times[base], sgd, strict=True)
                ]
                row["label"] = text
                low, median, high = np.percentile(diffs, [25, 50, 75])
                row["overhead_sgd_steps"] = {
                    "median": float(median),
                    "low": float(low),
                    "high": float(high),
                }
        record["rows"] += rows
        harness.describe_model(record, model, p)
    print(table(record), flush=True)
    return harness.finish(record, all_loads)


def table(record: harness.Record) -> str:
    models = list(dict.fromkeys(r["model"] for r in record["rows"]))
    by = {(r["model"], r["name"]): r for r in record["rows"]}
    columns = [("host read per step", lambda n: PAIRS[n][1])]
    for m in models:
        columns.append(
            (
                f"extra time, in SGD steps ({m})",
                lambda n, m=m: harness.ratio_cell(by.get((m, n), {}), "overhead_sgd_steps"),
            )
        )
    return harness.table(list(PAIRS), columns)
