"""Converts the results of the former ``experiments/bench_*.py`` scripts into records of the
harness's format, keeping every number they stored.

The former step-time JSON stored medians only (no per-window times): its ratios are ratios of
medians, shown without a range. ``results/benchmarks/matfree.log`` (its JSON was never written)
is parsed line by line into ``matfree.json``. :func:`convert_folder` rewrites the old JSON
files in place.
"""

from __future__ import annotations

import os
import re
from typing import Any

from benchmarks import harness

# What the README said each stored file was made with.
COMMANDS = {
    "steps": "python experiments/bench_steps.py --cond --repeats 10",
    "steps_efficient_idle": (
        "python experiments/bench_steps.py --only looksam random_sam ae_sam saner_random_sam "
        "momentum_sam --repeats 10"
    ),
    "parallel": "python experiments/bench_parallel.py",
    "measures": "python experiments/bench_measures.py --examples 1000 --repeats 5",
    "matfree": "python experiments/bench_matfree.py --keys 3 --repeats 5",
}
STEP_NAMES = {"msam": "msam_m8", "msam_parallel": "msam_m8_parallel"}


def _record(stem: str, benchmark: str, title: str, config: dict, machine: dict) -> dict:
    return {
        "format": harness.FORMAT,
        "benchmark": benchmark,
        "title": title,
        "command": COMMANDS.get(stem, "?"),
        "config": {**config, **({"tag": stem.split("_", 1)[1]} if "_" in stem else {})},
        "machine": machine,
        "reference": None,
        "rows": [],
        "notes": [],
        "converted_from": f"results/benchmarks/{stem} of the former script",
    }


def _steps(stem: str, old: dict[str, Any]) -> dict:
    from benchmarks import steps

    machine = {
        "cpu": None,
        "nproc": old.get("cpu_count"),
        "device": old.get("device"),
        "jax": None,
        "platform": old.get("platform"),
        "load_start": old.get("load_average"),
    }
    config = {
        "models": ["cnn8"],
        "batch_size": old["batch_size"],
        "rounds": old["repeats"],
        "window": old["window"],
        "planned_on_host": old.get("planned_on_host"),
    }
    record = _record(stem, "steps", steps.TITLE, config, machine)
    record["reference"] = "sgd"
    record["models"] = {"cnn8": {"description": "2-conv CNN (width 64) on 8×8 inputs, batch 256"}}
    for old_name, median in old["median_seconds"].items():
        name = STEP_NAMES.get(old_name, old_name)
        row = {
            "name": name,
            "model": "cnn8",
            "label": steps.label(name),
            "median_s": median,
            "ratio": {"median": old["ratio_to_sgd"][old_name], "low": None, "high": None},
            "ratio_sam": {"median": old["ratio_to_sam"][old_name], "low": None, "high": None},
            "compile_s": old.get("compile_seconds", {}).get(old_name),
            "temp_bytes": old.get("temp_bytes", {}).get(old_name),
        }
        if old_name in old.get("second_gradient_fraction", {}):
            row["g2_share"] = old["second_gradient_fraction"][old_name]
        if old_name in old.get("mean_ratio_to_sgd", {}):
            row["mean_ratio"] = old["mean_ratio_to_sgd"][old_name]
        record["rows"].append(row)
    record["notes"].append(
        "converted: the former script stored medians only; ratios are ratios of medians. "
        "g₂ share " + ("over the timed steps" if "mean_ratio_to_sgd" in old else "over the run")
    )
    return record


def _parallel(stem: str, old: dict[str, Any]) -> dict:
    from benchmarks import parallel

    machine = {
        "cpu": None,
        "nproc": old.get("cpu_count"),
        "device": old.get("device"),
        "jax": old.get("jax"),
        "python": old.get("python"),
    }
    config = {
        "model": old["model"],
        "batch_size": old["batch_size_per_device"],
        "rounds": old["rounds"],
        "window": old["inner_steps"],
        "local_devices": old["local_devices"],
    }
    record = _record(stem, "parallel", parallel.TITLE, config, machine)
    record["reference"] = "sam_jit"
    for name, r in old["results"].items():
        record["rows"].append(
            {
                "name": name,
                "model": old["model"],
                "median_s": r["median_ms"] / 1e3,
                "images_per_s": r["images_per_s"],
                "ratio": {"median": r["ratio_to_sam_jit"], "low": None, "high": None},
                "median_cpu_s": r["median_cpu_ms"] / 1e3,
                "cpu_ratio": r["cpu_ratio_to_sam_jit"],
            }
        )
    return record


def _measures(stem: str, old: dict[str, Any]) -> dict:
    from benchmarks import measures

    record = _record(stem, "measures", measures.TITLE, old["args"], dict(old["hardware"]))
    for model, row in old["models"].items():
        record["rows"].append({"name": model, "model": model, **row})
    return record


MATFREE_LINE = re.compile(
    r"^(\w+)\s+(\w+)\s+m=\s*(\d+)\s+(.+?)\s+error\s+(\S+)\s+time\s+(\S+) ms\s+compile\s+(\S+) s"
)


def _matfree(stem: str, text: str) -> dict:
    from benchmarks import matfree

    header = text.splitlines()[0].lstrip("# ")
    machine = {"cpu": "AMD EPYC", "nproc": 2, "jax": "0.10.2", "matfree": "0.6.3"}
    record = _record(stem, "matfree", matfree.TITLE, {"keys": 3, "repeats": 5}, machine)
    record["notes"].append(header)
    for line in text.splitlines()[1:]:
        match = MATFREE_LINE.match(line)
        if match:
            model, state, m, method, error, ms, compile_s = match.groups()
            record["rows"].append(
                {
                    "name": f"{model} {state} m={m} {method}",
                    "model": model,
                    "state": state,
                    "budget": int(m),
                    "method": method,
                    "error": float(error),
                    "median_s": float(ms) / 1e3,
                    "compile_s": float(compile_s),
                }
            )
    return record


def convert(path: str, data: Any) -> dict:
    """The record of the former script's output ``data`` read from ``path``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if isinstance(data, str):
        return _matfree(stem, data)
    if "median_seconds" in data:
        return _steps(stem, data)
    if "results" in data and "ratio_to_sam_jit" in str(data):
        return _parallel(stem, data)
    if "models" in data and "args" in data:
        return _measures(stem, data)
    raise ValueError(f"{path}: neither a {harness.FORMAT} record nor a known former format")


def convert_folder(folder: str) -> list[str]:
    """Rewrites every former-format ``*.json`` (and ``matfree.log``) of ``folder`` as a record;
    returns the paths written."""
    written = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".json"):
            data = harness.common.read_json(path)
            if isinstance(data, dict) and data.get("format") == harness.FORMAT:
                continue
            written.append(harness.write(convert(path, data), folder))
        elif name == "matfree.log":
            with open(path) as f:
                record = convert(path, f.read())
            written.append(harness.write(record, folder))  # the log stays: docstrings cite it
    return written
