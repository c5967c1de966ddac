"""Shared helpers of the experiment scripts: config and command line, files, tables, plots.

Every experiment is a script with a plain-Python config (a dict of JSON-able values), named
presets, and command-line overrides of any config key, big_vision style::

    python experiments/label_noise.py --preset default --seeds 0 1 2 --epochs 30 --out /tmp/x

A key's type comes from its value in the chosen preset: lists take several values
(``--seeds 0 1 2``), booleans take ``true/false``, dicts take JSON.

Where results go: ``--out DIR`` if given, else ``runs/<experiment>/<preset>/`` at the root of
the repository (ignored by git, so running an experiment never dirties the checkout), or
``$SHARPJAX_RUNS/<experiment>/<preset>/`` when that variable is set. The results the README
quotes are named, stored runs under ``results/`` (written with an explicit ``--out``).

Each experiment writes into its output folder: ``config.json``, raw per-run JSON under
``runs/`` (reused by a rerun with the same config), ``summary.json`` (every run with its
per-epoch history, without its full run config), ``table.md`` and PNG plots (matplotlib, Agg
backend). ``--report`` rewrites ``table.md`` and the plots from ``summary.json`` alone,
without training: that is how the committed tables and plots are regenerated on a fresh clone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# Config and command line.
# --------------------------------------------------------------------------------------


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _loose(text: str) -> Any:
    """A value of unknown type (the preset has None): JSON if it parses, else the string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _scalar_type(value: Any) -> Callable[[str], Any]:
    if isinstance(value, bool):
        return _to_bool
    if isinstance(value, int):
        return int
    if isinstance(value, float):
        return float
    if isinstance(value, str):
        return str
    return _loose


def plain_text(doc: str) -> str:
    """A docstring as plain text for ``--help``: without reST markup (````x````, ``:mod:``)."""
    text = re.sub(r":(?:mod|func|class|meth|attr):`~?([^`]+)`", r"\1", doc)
    return text.replace("``", "").replace("::\n", ":\n").strip()


def default_out(experiment: str, preset: str) -> str:
    """Where a run writes without ``--out``: ``$SHARPJAX_RUNS`` or ``<repo>/runs``, then
    ``<experiment>/<preset>``. ``runs/`` is in ``.gitignore``."""
    root = os.environ.get("SHARPJAX_RUNS") or os.path.join(REPO_ROOT, "runs")
    return os.path.join(root, experiment, preset)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "(none)"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value) if value != "" else "(empty)"


def parse_config(
    argv: Sequence[str] | None,
    presets: dict[str, dict[str, Any]],
    description: str,
    default_preset: str = "default",
    help: dict[str, str] | None = None,
    experiment: str | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """The config of ``--preset NAME`` (default ``default_preset``) with overrides applied.

    Every key of the preset is an option ``--key`` (dashes or underscores); ``help[key]``
    says what it means in ``--help``, next to its default in the chosen preset. Unknown keys
    are an error that lists the known ones. The returned dict also holds ``preset`` and
    ``report`` (``--report``: rebuild table and plots from the stored ``summary.json``; only
    offered when ``report`` is true). With
    ``experiment`` given, an ``out`` of None becomes :func:`default_out`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default=default_preset, choices=sorted(presets))
    known, _ = first.parse_known_args(argv)
    base = dict(presets[known.preset])
    help = help or {}
    missing = [key for key in base if help and key not in help]
    if missing:  # a programming error of the script, caught by its tests
        raise ValueError(f"parse_config: no help text for the config keys {missing}.")

    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Defaults shown are those of --preset {known.preset}; the presets "
            f"({', '.join(sorted(presets))}) differ in them. Lists take several values "
            "(--seeds 0 1 2), booleans true/false, dicts JSON."
        ),
    )
    parser.add_argument(
        "--preset",
        default=default_preset,
        choices=sorted(presets),
        help=f"named set of defaults (default: {default_preset})",
    )
    if report:
        parser.add_argument(
            "--report",
            action="store_true",
            help="do not train: rewrite table.md and the plots of --out from its summary.json",
        )
    for key, value in base.items():
        flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        text = help.get(key, "")
        shown = _describe(value)
        if key == "out" and value is None and experiment:
            shown = os.path.relpath(default_out(experiment, known.preset), os.getcwd())
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
        text = text.replace("%", "%%")  # argparse formats help with %
        if isinstance(value, list):
            element = _scalar_type(value[0]) if value else _loose
            parser.add_argument(*flags, dest=key, nargs="*", type=element, default=value, help=text)
        elif isinstance(value, dict):
            parser.add_argument(*flags, dest=key, type=json.loads, default=value, help=text)
        else:
            kind = str if key == "out" else _scalar_type(value)
            parser.add_argument(*flags, dest=key, type=kind, default=value, help=text)
    args = vars(parser.parse_args(argv))
    config = {key: args[key] for key in base}
    config["preset"] = args["preset"]
    if report:
        config["report"] = args["report"]
    if experiment and "out" in config and config["out"] is None:
        config["out"] = default_out(experiment, config["preset"])
    return config


# --------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------


def jsonable(value: Any, digits: int | None = 6) -> Any:
    """Python scalars for JSON; floats rounded to ``digits`` significant digits; NaN → None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, digits) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    number = float(np.asarray(value))
    if not math.isfinite(number):
        return None
    return float(f"{number:.{digits}g}") if digits else number


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def for_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs without their ``run_config``, histories kept, so that ``summary.json`` alone
    redraws every table and plot (``--report``)."""
    return [{k: v for k, v in r.items() if k != "run_config"} for r in runs]


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def load_cached_run(path: str, run_config: dict[str, Any]) -> dict[str, Any] | None:
    """The stored run at ``path`` if it was made with exactly ``run_config``, else None.

    Lets an interrupted experiment be restarted without redoing finished runs.
    """
    if not os.path.exists(path):
        return None
    try:
        stored = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    return stored if stored.get("run_config") == jsonable(run_config) else None


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so identical train steps compile once.

    ``train()`` builds a fresh jitted step for every run; runs that differ only in their data
    (e.g. the noise rate) lower to the same program and are then read from this cache.
    """
    import jax

    root = os.environ.get("SHARPJAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sharpjax"
    )
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def hardware() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, core count, JAX device, versions."""
    import jax

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit or None,
    }


def timing_line(
    runs: Sequence[dict[str, Any]],
    wall_seconds: float,
    hardware: dict[str, Any],
    preset: str,
    seconds: Callable[[dict[str, Any]], float] = lambda r: r.get("wall_seconds") or 0.0,
) -> str:
    """The closing line of a ``table.md``: wall time, reused runs, the runs' own times, machine.

    Runs reused from ``runs/`` (``reused`` set by the script) are counted apart, so a table
    regenerated from stored runs still says how long the runs themselves took.
    """
    trained = sum(not r.get("reused") for r in runs)
    total = sum(seconds(r) for r in runs)
    return (
        f"\nWall time {wall_seconds / 60:.1f} min ({trained} of {len(runs)} runs trained, the "
        f"others reused from runs/); the runs themselves took "
        f"{total / 60:.1f} min in all. Hardware: {hardware['nproc']} × {hardware['cpu']} "
        f"({hardware['device']}); preset `{preset}`.\n"
    )


class Stopwatch:
    """Wall time since construction: ``Stopwatch().seconds``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


class RunProgress:
    """One progress bar over all the runs of an experiment, with an ETA, plus a line per run.

    ``start(name, compiling=...)`` shows which run is training (and, for the first run of a
    kind, that its step is compiling, which takes most of a short run's time);
    ``finish(line)`` prints one line for the finished run and advances the bar;
    ``reused(line)`` does the same for a stored run that was not trained again. The bar
    writes to stderr, the lines to stdout, so ``> log.txt`` keeps the lines only.
    """

    def __init__(self, total: int, description: str, disable: bool | None = None) -> None:
        from tqdm.auto import tqdm

        self.total = total
        self.done = 0
        self._tqdm = tqdm
        self.bar = tqdm(total=total, desc=description, unit="run", disable=disable)

    def start(self, name: str, compiling: bool = False) -> None:
        note = "compiling its train step (the first of its kind; later ones reuse it)"
        self.bar.set_postfix_str(f"{name}: {note if compiling else 'training'}", refresh=True)

    def _line(self, text: str) -> None:
        self.done += 1
        self._tqdm.write(f"[{self.done}/{self.total}] {text}", file=sys.stdout)
        self.bar.update(1)

    def finish(self, line: str) -> None:
        self._line(line)

    def reused(self, line: str) -> None:
        self._line(f"{line} (stored run reused)")

    def close(self) -> None:
        self.bar.set_postfix_str("")
        self.bar.close()


# --------------------------------------------------------------------------------------
# Statistics and tables.
# --------------------------------------------------------------------------------------


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1; 0 for one value) and count of the finite values."""
    xs = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if xs.size == 0:
        return math.nan, math.nan, 0
    std = float(xs.std(ddof=1)) if xs.size > 1 else 0.0
    return float(xs.mean()), std, int(xs.size)


def fmt_mean_std(values: Iterable[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """``"84.3 ± 1.2"`` (values times ``scale``), or ``"—"`` when there are none."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "—"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def paired_differences(
    runs_a: Iterable[dict[str, Any]], runs_b: Iterable[dict[str, Any]], key: str
) -> list[float]:
    """``a[key] − b[key]`` for every seed both lists have (same seed: same data, init, noise)."""
    b_by_seed = {r["seed"]: r[key] for r in runs_b}
    return [
        r[key] - b_by_seed[r["seed"]]
        for r in runs_a
        if r["seed"] in b_by_seed and r[key] is not None and b_by_seed[r["seed"]] is not None
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (first column left-aligned, the rest right)."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = [
        "| " + " | ".join(map(str, headers)) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------------


DPI = 150


def save_figure(fig: plt.Figure, path: str, title: str | None = None) -> str:
    """Saves ``fig`` as a ``DPI`` PNG at ``path`` (folders created) and closes it.

    ``title`` goes above all panels; a plot should name its dataset, model, noise and metric
    there. Returns the path.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def subplot_grid(count: int, ncols: int = 3, size: float = 4.2) -> tuple[plt.Figure, np.ndarray]:
    """A figure with ``count`` panels on a grid (``size`` inches wide each); unused panels are
    hidden."""
    ncols = max(1, min(ncols, count))
    nrows = max(1, math.ceil(count / ncols))
    width = max(size * ncols, 6.0)  # one panel alone is still readable on a laptop screen
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 0.75 * width / ncols * nrows))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes


def percent_axis(ax: plt.Axes, axis: str = "y") -> None:
    """Shows fractions (0.5) as percentages (50 %) on ``axis``, as the tables do, with as many
    decimals as the ticks need (32.5 %, not a rounded 33 %)."""
    from matplotlib.ticker import PercentFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))


def band_note(count: int) -> str:
    """The legend entry that explains the shaded band of :func:`plot_band`."""
    return f"shaded: mean ± 1 std over {count} seeds" if count > 1 else "one seed: no band"


def figure_legend(
    fig: plt.Figure, axes: Sequence[plt.Axes], fontsize: int = 9, note: str | None = None
) -> None:
    """One legend for the whole figure, below the panels, with every label of every panel,
    and ``note`` (e.g. :func:`band_note`) as a last entry with a grey patch."""
    from matplotlib.patches import Patch

    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if note:
        handles[note] = Patch(color="grey", alpha=0.25, lw=0)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(len(handles), 4),
            fontsize=fontsize,
            frameon=False,
        )


def plot_band(ax: plt.Axes, x: Sequence[float], curves: Sequence[Sequence[float]], **kw) -> None:
    """Mean of ``curves`` (one per seed, same length) as a line, ± one std as a band."""
    data = np.asarray([[np.nan if v is None else v for v in curve] for curve in curves], np.float64)
    mean = np.nanmean(data, axis=0)
    (line,) = ax.plot(x, mean, **kw)
    if len(data) > 1:
        std = np.nanstd(data, axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)


def have_histories(runs: Sequence[dict[str, Any]]) -> bool:
    """True when every run carries its per-epoch ``history`` (summaries written before the
    histories were stored in ``summary.json`` do not: their curve plots cannot be redrawn)."""
    return bool(runs) and all(r.get("history") for r in runs)


def is_png(path: str) -> bool:
    """True for a non-empty file that starts with the PNG signature."""
    if not os.path.exists(path) or os.path.getsize(path) <= len(PNG_SIGNATURE):
        return False
    with open(path, "rb") as f:
        return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def relative(path: str, start: str) -> str:
    """``path`` relative to ``start`` (for links in tables and messages)."""
    return os.path.relpath(path, start)


def run_experiment(
    argv: list[str] | None,
    presets: dict[str, dict[str, Any]],
    description: str,
    run_all: Callable[[dict[str, Any], str], list[dict[str, Any]]],
    make_tables: Callable[..., str],
    make_plots: Callable[..., list[str]],
    analyse: Callable[[list[dict[str, Any]]], dict[str, Any]] = lambda runs: {},
    seconds: Callable[[dict[str, Any]], float] | None = None,
    help: dict[str, str] | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """The one ``main`` of every experiment: config, runs, ``summary.json``, ``table.md``, plots.

    ``analyse(runs)`` returns named results computed from all runs (e.g. correlations); they
    go into ``summary.json`` and are passed by name to ``make_tables(config, runs, ...)`` and
    ``make_plots(config, runs, out, ...)``. ``seconds(run)`` is a run's own time for the
    closing timing line. ``help`` documents every config key for ``--help``; ``experiment``
    names the default output folder (:func:`default_out`). With ``--report``, nothing is
    trained: config and runs come from ``<out>/summary.json`` and only ``table.md`` and the
    plots are rewritten. Returns ``{"config", "runs", <analysis>, "table", "plots", "out"}``.
    """
    config = parse_config(argv, presets, description, help=help, experiment=experiment)
    out = config["out"]
    if config["report"]:
        path = os.path.join(out, "summary.json")
        if not os.path.exists(path):
            raise SystemExit(
                f"--report reads {path}, which does not exist: pass the --out of a finished "
                "run (e.g. one under results/), or drop --report to train."
            )
        stored = read_json(path)
        config = {**stored["config"], "out": out, "report": True}
        machine, wall = stored["hardware"], stored["wall_seconds"]
        runs = stored["runs"]
    else:
        enable_compilation_cache()
        os.makedirs(out, exist_ok=True)
        watch = Stopwatch()
        machine = hardware()
        write_json(os.path.join(out, "config.json"), {**config, "hardware": machine})
        runs = run_all(config, out)
    analysis = analyse(runs)
    if not config["report"]:
        wall = watch.seconds
        summary = {"config": config, "hardware": machine, "wall_seconds": wall, **analysis}
        write_json(os.path.join(out, "summary.json"), {**summary, "runs": for_summary(runs)})
    table = make_tables(config, runs, **analysis)
    timing = {"seconds": seconds} if seconds else {}
    table += timing_line(runs, wall, machine, config["preset"], **timing)
    write_text(os.path.join(out, "table.md"), table)
    plots = make_plots(config, runs, out, **analysis)
    shown = relative(out, os.getcwd())
    print("\n" + table)
    print(f"Results in {shown}/: table.md, summary.json" + ("" if config["report"] else ", runs/"))
    print("Plots: " + ", ".join(relative(p, os.getcwd()) for p in plots))
    if not have_histories(runs):
        print("(summary.json has no per-epoch histories: the curve plots were not redrawn)")
    return {"config": config, "runs": runs, **analysis, "table": table, "plots": plots, "out": out}
