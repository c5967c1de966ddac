"""The one timing harness of the benchmarks: interleaved windows, medians and ranges, the
machine and its load, one JSON format and one markdown table writer.

A benchmark is a function ``run(config) -> Record``. It builds its steps (zero-argument
callables that advance one step and return what to wait on), times them with
:func:`interleaved` (a window of each step in turn, round after round, so that the shared
machine's noise falls on every step alike), and turns the per-window times into rows with
:func:`timing_rows` (medians, ranges, and per-round ratios to a reference step). Numbers that
are not times (XLA's memory accounting, accuracies) are rows too. :func:`new_record` stamps
the machine (CPU model, cores, JAX version, device, git commit) and its load before and after;
:func:`interleaved` samples the load once per round.

The JSON format (``FORMAT``)::

    {"format": "sharpjax-benchmark/1", "benchmark": "steps", "title": "...",
     "command": "python -m experiments.benchmarks --only steps ...",
     "config": {...},                 # what the rows were measured with
     "machine": {"cpu", "nproc", "device", "jax", "python", "git_commit", "time_utc",
                 "load_start": [1, 5, 15 min], "load_end": [...],
                 "load_rounds": {"min", "median", "max"} or absent},
     "reference": "sgd" or null,      # the step the ratios divide by
     "rows": [{"name": ..., ...}],    # one dict per measured thing
     "notes": [...], "converted_from": "..." (a record converted from an older script)}

A timed row holds ``median_s``, ``min_s``, ``max_s``, ``times_s`` (one mean step time per
window) and, with a reference, ``ratio`` = ``{"median", "low", "high"}``: the median and the
quartiles of the per-round ratios (each window divided by the reference's window of the same
round, so a load spike that hits both cancels).
"""

from __future__ import annotations

import datetime
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)

import common  # noqa: E402  (experiments/common.py: hardware(), jsonable(), write_json())

FORMAT = "sharpjax-benchmark/1"
REPO_ROOT = common.REPO_ROOT
RESULTS = os.path.join(REPO_ROOT, "results", "benchmarks")
Record = dict[str, Any]
Step = Callable[[], Any]


# --------------------------------------------------------------------------------------
# The machine.
# --------------------------------------------------------------------------------------


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (runnable processes; cores: ``os.cpu_count()``)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """CPU model, core count, JAX version and device, git commit, UTC time and load now."""
    info = common.hardware()
    info["time_utc"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    info["load_start"] = load()
    return info


def new_record(
    benchmark: str, title: str, config: Mapping[str, Any], reference: str | None = None
) -> Record:
    """An empty record of ``benchmark``: the machine and its load now, no rows yet."""
    return {
        "format": FORMAT,
        "benchmark": benchmark,
        "title": title,
        "command": command_line(),
        "config": dict(config),
        "machine": machine(),
        "reference": reference,
        "rows": [],
        "notes": [],
    }


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("benchmarks", "__main__.py")):
        return "python -m experiments.benchmarks " + shlex.join(argv[1:])
    if argv and argv[0].endswith(".py"):
        argv[0] = os.path.relpath(argv[0], REPO_ROOT)
    return "python " + shlex.join(argv)


def describe_model(record: Record, name: str, prepared: Any) -> None:
    """Records a benchmarked model's description and parameter count under ``models``."""
    record.setdefault("models", {})[name] = {
        "description": prepared.description,
        "params": prepared.num_params,
    }


def finish(record: Record, rounds_load: Sequence[float] | None = None) -> Record:
    """Stamps the load at the end (and the load sampled each round) on ``record``."""
    record["machine"]["load_end"] = load()
    if rounds_load:
        record["machine"]["load_rounds"] = {
            "min": round(min(rounds_load), 2),
            "median": round(float(np.median(rounds_load)), 2),
            "max": round(max(rounds_load), 2),
        }
    return record


# --------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------


def block(value: Any) -> Any:
    """Waits for every array in ``value`` (JAX dispatches asynchronously)."""
    import jax

    return jax.block_until_ready(value)


def interleaved(
    steps: Mapping[str, Step], rounds: int, window: int = 1, warmup: int = 1
) -> tuple[dict[str, list[float]], list[float]]:
    """Times ``steps`` in interleaved windows: per round, ``window`` calls of each step in turn.

    Each step is a zero-argument callable that runs one step (keeping its own state) and
    returns what to wait on; a window waits only after its last call, so dispatch overlaps
    compute as in a training loop. ``warmup`` untimed rounds come first (compilation, caches).
    Returns ``({name: seconds per step of each window}, [1-minute load of each round])``.
    """
    if rounds < 1 or window < 1 or warmup < 0:
        raise ValueError(
            f"interleaved: rounds and window must be >= 1 and warmup >= 0, got rounds={rounds}, "
            f"window={window}, warmup={warmup}."
        )

    def one_window(step: Step) -> float:
        start = time.perf_counter()
        out = None
        for _ in range(window):
            out = step()
        block(out)
        return (time.perf_counter() - start) / window

    for _ in range(warmup):
        for step in steps.values():
            one_window(step)
    times: dict[str, list[float]] = {name: [] for name in steps}
    loads = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for name, step in steps.items():
            times[name].append(one_window(step))
    return times, loads


def ratio_summary(values: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios ``values[i] / reference[i]``."""
    ratios = np.asarray(values, np.float64) / np.asarray(reference, np.float64)
    low, median, high = np.percentile(ratios, [25, 50, 75])
    return {"median": float(median), "low": float(low), "high": float(high)}


def timing_rows(
    times: Mapping[str, Sequence[float]],
    reference: str | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per timed step: median, min and max seconds per step, the windows' times and,
    with ``reference``, the per-round ratio to it; ``extra[name]`` is merged into the row."""
    rows = []
    for name, values in times.items():
        row: dict[str, Any] = {
            "name": name,
            "median_s": float(np.median(values)),
            "min_s": float(np.min(values)),
            "max_s": float(np.max(values)),
            "times_s": [float(v) for v in values],
        }
        if reference is not None:
            row["ratio"] = ratio_summary(values, times[reference])
        row.update((extra or {}).get(name, {}))
        rows.append(row)
    return rows


def compile_seconds(jitted: Any, *args: Any) -> tuple[Any, float, int | None]:
    """``jitted`` lowered and compiled for ``args``: (executable, seconds, XLA temp bytes)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = None if memory is None else int(memory.temp_size_in_bytes)
    return compiled, seconds, temp


# --------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------


def stem(record: Record) -> str:
    """A record's file name without ``.json``: ``<benchmark>`` or ``<benchmark>_<tag>``."""
    tag = record["config"].get("tag")
    return record["benchmark"] + (f"_{tag}" if tag else "")


def write(record: Record, folder: str) -> str:
    """Writes ``record`` as ``<folder>/<stem>.json`` (:func:`stem`); returns the path."""
    check(record)
    path = os.path.join(folder, f"{stem(record)}.json")
    common.write_json(path, record)
    return path


def read(path: str) -> Record:
    """A record from ``path``; a record of an older script is converted (:mod:`legacy`)."""
    data = common.read_json(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data
    from benchmarks import legacy

    return legacy.convert(path, data)


def read_all(folder: str) -> dict[str, Record]:
    """Every ``*.json`` record in ``folder`` by file stem, sorted by name."""
    names = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
    return {name[: -len(".json")]: read(os.path.join(folder, name)) for name in names}


def check(record: Record) -> None:
    """Raises ValueError naming what is missing when ``record`` is not in ``FORMAT``."""
    if not isinstance(record, dict):
        raise ValueError(f"a benchmark record is a dict, got {type(record).__name__}")
    missing = [
        key
        for key in ("format", "benchmark", "title", "config", "machine", "rows")
        if key not in record
    ]
    if missing or record["format"] != FORMAT:
        raise ValueError(
            f"not a {FORMAT} record (missing {missing}, format {record.get('format')!r}); "
            "build it with harness.new_record."
        )
    for row in record["rows"]:
        if "name" not in row:
            raise ValueError(f"record {record['benchmark']!r}: a row without a name: {row}")


# --------------------------------------------------------------------------------------
# Tables.
# --------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    """A number with ``digits`` decimals (and ``suffix``); ``""`` for None or NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}f}{suffix}"


def ratio_cell(row: Mapping[str, Any], key: str = "ratio", digits: int = 2) -> str:
    """``"1.78 (1.70–1.85)"``: the median per-round ratio and its quartiles; ``"1.78"`` for a
    converted record that stored the ratio of medians only; ``""`` when there is none."""
    ratio = row.get(key)
    if ratio is None:
        return ""
    if not isinstance(ratio, dict):
        return fmt(ratio, digits)
    if ratio.get("low") is None:
        return fmt(ratio["median"], digits)
    return f"{ratio['median']:.{digits}f} ({ratio['low']:.{digits}f}–{ratio['high']:.{digits}f})"


def table(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, Callable[[Mapping], Any]]]
) -> str:
    """A markdown table of ``rows``: one ``(header, cell(row))`` per column."""
    rows = list(rows)
    return common.markdown_table(
        [header for header, _ in columns], [[str(cell(r)) for _, cell in columns] for r in rows]
    )


def load_note(record: Record) -> str:
    """``"load 3.1–4.5 on 2 cores, 2026-12-03 16:40 UTC, JAX 0.10.2"``, for a table caption."""
    m = record["machine"]
    rounds = m.get("load_rounds")
    if rounds:
        span = f"{rounds['min']:.1f}–{rounds['max']:.1f}"
    else:
        ends = [m[k][0] for k in ("load_start", "load_end") if m.get(k)]
        span = "–".join(f"{v:.1f}" for v in sorted(set(ends))) if ends else None
    when = f", {m['time_utc']} UTC" if m.get("time_utc") else ""
    jax_version = f", JAX {m['jax']}" if m.get("jax") else ""
    cores = f"{m.get('nproc', '?')} cores"
    load_text = f"load {span} on {cores}" if span else f"{cores}, load not recorded"
    return f"{load_text}{when}{jax_version}"


def caption(record: Record, path: str | None = None) -> str:
    """The line under a README table: command, machine load and the JSON it came from."""
    source = f"; [{os.path.relpath(path, REPO_ROOT)}]({os.path.relpath(path, REPO_ROOT)})"
    models = record.get("models") or {}
    described = "; ".join(
        f"{name}: {info['description']}" for name, info in models.items() if "description" in info
    )
    converted = " (converted from a former script's JSON)" if record.get("converted_from") else ""
    text = f"`{record['command']}`: {load_note(record)}{source if path else ''}{converted}"
    return text + (f". {described}." if described else "")


MARKER = re.compile(r"(<!-- table:([\w.-]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)


def replace_tables(text: str, tables: Mapping[str, str]) -> tuple[str, list[str]]:
    """``text`` with each ``<!-- table:NAME -->…<!-- /table -->`` block's body replaced by
    ``tables[NAME]``; returns the text and the names replaced (blocks of unknown names stay)."""
    done = []

    def swap(match: re.Match) -> str:
        name = match.group(2)
        if name not in tables:
            return match.group(0)
        done.append(name)
        return match.group(1) + tables[name].rstrip("\n") + "\n" + match.group(4)

    return MARKER.sub(swap, text), done
