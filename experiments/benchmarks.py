"""All benchmarks from one command: step time, measure cost and data-parallel overhead.

Runs ``experiments/bench_steps.py`` (step time of every optimizer, relative to SGD and SAM),
``experiments/bench_measures.py`` (cost of the sharpness measures) and
``experiments/bench_parallel.py`` (pmap / shard_map steps against the plain jitted SAM step),
each in its own Python process (so device flags and compilation caches of one benchmark
cannot leak into the next), with ``--out <out>/<name>.json`` appended to its arguments. A
benchmark script that is missing is reported and skipped. Then writes ``table.md`` (the
commands, exit codes, wall times and the key numbers of each JSON) and ``step_time.png``.

    python experiments/benchmarks.py                      # all three, into runs/benchmarks/
    python experiments/benchmarks.py --out results/benchmarks   # the README's stored numbers
    python experiments/benchmarks.py --benchmarks steps --steps_args="--repeats 50"
    python experiments/benchmarks.py --preset tiny --out /tmp/bench

Arguments of a benchmark are one string (``--steps_args="--repeats 50 --only sam vasso"``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

EXPERIMENT = "benchmarks"
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {
    "steps": "bench_steps.py",
    "measures": "bench_measures.py",
    "parallel": "bench_parallel.py",
}

DEFAULT: dict[str, Any] = {
    "benchmarks": ["steps", "measures", "parallel"],
    "steps_args": "",
    "measures_args": "",
    "parallel_args": "",
    "timeout_s": 3600,
    "dry_run": False,
    "out": None,
}
# What each config key means, for --help (the default of the chosen preset is added).
HELP = {
    "benchmarks": "which benchmarks to run: steps, measures, parallel",
    "steps_args": "arguments of bench_steps.py, one string (--steps_args='--repeats 50')",
    "measures_args": "arguments of bench_measures.py, one string",
    "parallel_args": "arguments of bench_parallel.py, one string",
    "timeout_s": "seconds after which a benchmark process is stopped",
    "dry_run": "print the commands and write the table without running anything",
    "out": "output folder; the README's numbers are the stored --out results/benchmarks",
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": DEFAULT,
    # A smoke run: a few steps of SGD and SAM on a narrow CNN; the other two are skipped.
    "tiny": {
        **DEFAULT,
        "benchmarks": ["steps"],
        "steps_args": "--repeats 3 --warmup 1 --batch-size 16 --width 4 --only sgd sam",
        "parallel_args": "--model mlp --batch-size 8 --rounds 2 --inner 1 --warmup 1",
        "timeout_s": 300,
        "out": None,
    },
}


def command(config: dict[str, Any], name: str) -> list[str]:
    """The command line of benchmark ``name``: its script, its args, ``--out <out>/<name>.json``."""
    if name not in SCRIPTS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(SCRIPTS)}")
    args = shlex.split(config[f"{name}_args"])
    out = os.path.join(config["out"], f"{name}.json")
    return [sys.executable, os.path.join(HERE, SCRIPTS[name]), *args, "--out", out]


def run_one(config: dict[str, Any], name: str) -> dict[str, Any]:
    """Runs one benchmark (unless ``dry_run``); returns its record."""
    cmd = command(config, name)
    record: dict[str, Any] = {"name": name, "command": shlex.join(cmd[1:])}
    if not os.path.exists(cmd[1]):
        print(f"[{name}] skipped: {SCRIPTS[name]} does not exist", flush=True)
        return {**record, "status": "missing"}
    if config["dry_run"]:
        print(f"[{name}] would run: {shlex.join(cmd)}", flush=True)
        return {**record, "status": "dry_run"}
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    watch = common.Stopwatch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [common.REPO_ROOT]))}
    try:
        proc = subprocess.run(cmd, env=env, timeout=config["timeout_s"], check=False)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timeout after {config['timeout_s']} s"
    record.update(status=status, wall_seconds=watch.seconds)
    json_path = cmd[-1]
    if status == "ok" and os.path.exists(json_path):
        record["result"] = common.read_json(json_path)
    return record


def key_numbers(record: dict[str, Any]) -> str:
    """A one-cell summary of a benchmark's JSON."""
    result = record.get("result")
    if not isinstance(result, dict):
        return "—"
    if record["name"] == "steps" and "ratio_to_sgd" in result:
        ratios = result["ratio_to_sgd"]
        return ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()) + " (step time / SGD)"
    if record["name"] == "parallel" and "results" in result:
        rows = result["results"]
        return (
            ", ".join(
                f"{k} {v['ratio_to_sam_jit']:.2f}×"
                for k, v in rows.items()
                if "ratio_to_sam_jit" in v
            )
            + " (step time / jitted SAM)"
        )
    scalars = {k: v for k, v in result.items() if isinstance(v, int | float | str | bool)}
    return ", ".join(f"{k}={v}" for k, v in list(scalars.items())[:8]) or "see JSON"


def make_table(records: list[dict[str, Any]]) -> str:
    rows = [
        [
            r["name"],
            f"`{r['command']}`",
            r["status"],
            f"{r['wall_seconds']:.0f} s" if "wall_seconds" in r else "—",
            key_numbers(r),
        ]
        for r in records
    ]
    return "# Benchmarks\n\n" + common.markdown_table(
        ["benchmark", "command", "status", "wall time", "key numbers"], rows
    )


def plot_steps(records: list[dict[str, Any]], out: str) -> list[str]:
    """Bar chart of the step-time ratios to SGD, when the step benchmark ran."""
    import matplotlib.pyplot as plt

    steps = next((r for r in records if r["name"] == "steps" and "result" in r), None)
    if steps is None or "ratio_to_sgd" not in steps["result"]:
        return []
    ratios = steps["result"]["ratio_to_sgd"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(list(ratios), list(ratios.values()), color="tab:blue")
    ax.axhline(2.0, color="k", ls="--", lw=0.8, label="2× SGD (two gradients)")
    ax.set_ylabel("median step time / SGD")
    ax.set_title("Step time per optimizer (bench_steps.py)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=7)
    return [common.save_figure(fig, os.path.join(out, "step_time.png"))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the selected benchmarks; returns ``{"config", "records", "table", "plots"}``."""
    config = common.parse_config(
        argv,
        PRESETS,
        common.plain_text(__doc__),
        help=HELP,
        experiment=EXPERIMENT,
        report=False,
    )
    unknown = [b for b in config["benchmarks"] if b not in SCRIPTS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {sorted(SCRIPTS)}")
    out = config["out"]
    os.makedirs(out, exist_ok=True)
    records = [run_one(config, name) for name in config["benchmarks"]]
    hardware = common.hardware()
    common.write_json(
        os.path.join(out, "summary.json"),
        {"config": config, "hardware": hardware, "records": records},
    )
    table = make_table(records)
    table += f"\nHardware: {hardware['nproc']} × {hardware['cpu']} ({hardware['device']}).\n"
    plots = [] if config["dry_run"] else plot_steps(records, out)
    if not config["dry_run"]:
        common.write_text(os.path.join(out, "table.md"), table)
    print("\n" + table)
    return {"config": config, "records": records, "table": table, "plots": plots}


if __name__ == "__main__":
    main()
