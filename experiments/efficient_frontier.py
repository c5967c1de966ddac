"""Accuracy against cost: the efficient sharpness-aware variants under 40 % label noise.

Claim tested (issue 11; papers in docs/algorithms.md): LookSAM, RST, AE-SAM and ESAM keep most
of SAM's gain over SGD while taking the second gradient on only some steps (or, for ESAM, on
part of the weights). Every (optimizer, seed) is one ``sharpjax.train.train`` run in the
label-noise experiment's default setup (experiments/label_noise.py: mnist1d + the 1-D CNN,
40 % symmetric noise, SGD lr 0.1 with momentum 0.9 and cosine decay, weight decay 5e-4, batch
128, ρ = 0.1 for every SAM-like method, SANER α = 0.5 after a quarter of training).

Cost, two measures, both relative to SGD of the same seed:

* gradients per step: 1 + the fraction of steps that took the second gradient (the
  trainer's ``second_gradient`` diagnostic, averaged over the run; 2 for SAM and SANER);
* measured training time: the median over epochs 2.. of the epoch's training time (no
  evaluation, no compilation), divided by SGD's. The runs are sequential on a shared
  machine, so this ratio is noisy; ``experiments/benchmarks/steps.py`` times the steps
  interleaved.

The variants run with their papers' defaults: LookSAM k = 5, α = 0.7; RST p = 0.5 (and SANER
on RST); AE-SAM with the paper's threshold schedule over the run (about half the steps);
ESAM's stochastic weight perturbation β = 0.6 (the trainer passes no per-example losses, so
without its data selection: still a whole second pass). Momentum-SAM is not in the trainer
(its loop holds the perturbed weights) and not here.

Presets: ``default`` (8 optimizers x 3 seeds, 30 epochs; about 15 min on 2 busy cores),
``recent_bn`` (SGD, SAM, SAM-ON and the recent rules F-SAM, WSAM, late-phase SAM, SAMPa and
Lookbehind-SAM on the 1-D CNN with BatchNorm, since SAM-ON perturbs only normalisation
layers; SAM-ON at ρ = 1.0, 10x SAM's as its paper advises; 24 runs), ``tiny`` (seconds, for
the tests). Outputs (``--out``, default
``runs/efficient_frontier/<preset>/``; the README's results are ``results/efficient_frontier``):
``summary.json``, ``table.md``, ``runs/*.json``, ``frontier.png``.

    python experiments/efficient_frontier.py --out results/efficient_frontier
    python experiments/efficient_frontier.py --out results/efficient_frontier --report
    python experiments/efficient_frontier.py --optimizers sgd sam fsam wsam late_phase_sam \
        sampa lookbehind_sam --out results/efficient_frontier_recent
    python experiments/efficient_frontier.py --preset recent_bn --out results/efficient_frontier_bn
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import label_noise
import matplotlib.pyplot as plt
import numpy as np

EXPERIMENT = "efficient_frontier"
SETTING = "symmetric:0.4"
NAMES = {
    **label_noise.NAMES,
    "looksam": "LookSAM",
    "random_sam": "RST",
    "ae_sam": "AE-SAM",
    "saner_random_sam": "SANER on RST",
    "esam": "ESAM (SWP)",
}
# Gradients per step beyond one that the second_gradient diagnostic does not show: Lookbehind
# takes k = 2 gradients after the clean one (sharpjax.train.config.make_optimizer).
EXTRA_GRADIENTS = {"lookbehind_sam": 2.0}
# The recent rules (issue 20), run with `--optimizers sgd sam fsam wsam late_phase_sam sampa
# lookbehind_sam`; SAM-ON needs normalisation layers, which the default CNN1D does not have:
# preset recent_bn (the 1-D CNN with BatchNorm).
RECENT = label_noise.RECENT
# The runs keep, besides the label-noise experiment's history, the two cost measures' inputs.
label_noise.HISTORY_KEYS = (*label_noise.HISTORY_KEYS, "second_gradient", "train_time")

DEFAULT: dict[str, Any] = {
    **label_noise.DEFAULT,
    "optimizers": [
        "sgd",
        "sam",
        "saner",
        "looksam",
        "random_sam",
        "ae_sam",
        "saner_random_sam",
        "esam",
    ],
    "extra_optimizers": [],
    "extra_noise": [],
    "noise": [SETTING],
}
PRESETS: dict[str, dict[str, Any]] = {
    "default": DEFAULT,
    # SAM-ON, SAM and the recent rules on the 1-D CNN with BatchNorm (label_noise's recent_bn).
    "recent_bn": {
        **DEFAULT,
        "model_kwargs": {"batch_norm": True},
        "optimizers": ["sgd", "sam", "sam_on", *RECENT],
    },
    "tiny": {
        **label_noise.PRESETS["tiny"],
        "optimizers": ["sgd", "sam", "looksam", "random_sam"],
        "extra_optimizers": [],
        "extra_noise": [],
        "noise": [SETTING],
        "epochs": 3,
    },
}
HELP = {
    **label_noise.HELP,
    "optimizers": "optimizers on the frontier (sgd sam saner looksam random_sam ae_sam "
    "saner_random_sam esam ...)",
    "noise": f"label-noise setting(s) KIND:RATE; the frontier is drawn at {SETTING}",
}


def run_all(config: dict[str, Any], out: str) -> list[dict[str, Any]]:
    """The label-noise experiment's runs (one ``sharpjax.train.train`` each), reused."""
    return label_noise.run_all(config, out)


def _fraction(run: dict[str, Any]) -> float:
    """The share of the run's steps that took the second gradient (1 without a policy)."""
    values = [h.get("second_gradient") for h in run["history"]]
    if run["optimizer"] in ("sgd", "adamw"):
        return 0.0
    if run["optimizer"] in EXTRA_GRADIENTS:
        return EXTRA_GRADIENTS[run["optimizer"]]
    if any(v is None for v in values):
        return 1.0
    return float(np.mean(values))  # every epoch has the same number of steps


def _epoch_seconds(run: dict[str, Any]) -> float:
    times = [h["train_time"] for h in run["history"][1:] if h.get("train_time") is not None]
    return float(np.median(times)) if times else float("nan")


def analyse(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per optimizer: accuracies and the two costs relative to SGD of the same seed."""
    by = {(r["optimizer"], r["seed"]): r for r in runs if r["noise"] == SETTING}
    seeds = sorted({seed for _, seed in by})
    frontier = {}
    for opt in dict.fromkeys(r["optimizer"] for r in runs):
        rows = [by[(opt, s)] for s in seeds if (opt, s) in by and ("sgd", s) in by]
        if not rows:
            continue
        sgd = {s: by[("sgd", s)] for s in seeds if ("sgd", s) in by}
        frontier[opt] = {
            "final": [r["final_test_accuracy"] for r in rows],
            "best": [r["best_test_accuracy"] for r in rows],
            "memorization": [r["final_memorization"] for r in rows],
            "gradients": [1.0 + _fraction(r) for r in rows],
            "time_ratio": [_epoch_seconds(r) / _epoch_seconds(sgd[r["seed"]]) for r in rows],
        }
    gain = {}
    if "sam" in frontier and "sgd" in frontier:
        sam_gain = np.mean(frontier["sam"]["final"]) - np.mean(frontier["sgd"]["final"])
        for opt, f in frontier.items():
            own = np.mean(f["final"]) - np.mean(frontier["sgd"]["final"])
            gain[opt] = float(own / sam_gain) if abs(sam_gain) > 1e-9 else None
    return {"frontier": frontier, "kept_gain": gain}


def make_tables(config, runs, frontier=None, kept_gain=None) -> str:
    frontier = frontier if frontier is not None else analyse(runs)["frontier"]
    kept_gain = kept_gain or {}
    headers = [
        "optimizer",
        "final test acc.",
        "best test acc.",
        "final memorisation",
        "gradients / step (÷ SGD)",
        "measured time ÷ SGD",
        "share of SAM's gain over SGD",
    ]
    rows = []
    for opt, f in frontier.items():
        kept = kept_gain.get(opt)
        mean_t, std_t, _ = common.mean_std(f["time_ratio"])
        rows.append(
            [
                NAMES.get(opt, opt),
                common.fmt_mean_std(f["final"]),
                common.fmt_mean_std(f["best"]),
                common.fmt_mean_std(f["memorization"]),
                f"{np.mean(f['gradients']):.2f}",
                f"{mean_t:.2f} ± {std_t:.2f}",
                "—" if kept is None else f"{100 * kept:.0f} %",
            ]
        )
    seeds = len(config["seeds"])
    return (
        f"# Accuracy against cost at 40 % symmetric label noise ({_setup(config)})\n\n"
        f"Mean ± std over {seeds} seeds. *Gradients / step*: 1 + the share of steps that took "
        "the second gradient (SGD 1, SAM 2). *Measured time*: median training time of an "
        "epoch (epochs 2..; no evaluation, no compilation) divided by SGD's of the same seed; "
        "sequential runs on a shared machine, so noisy. *Share of SAM's gain*: (final "
        "accuracy − SGD's) / (SAM's − SGD's), means over seeds. On CPU the trainer runs "
        "LookSAM, RST and AE-SAM without `lax.cond` (the decision read on the host, one "
        "program per decision), since XLA:CPU runs a conv gradient inside `lax.cond` many "
        "times slower (experiments/benchmarks/cond.py); the host round trip per step remains.\n\n"
        + common.markdown_table(headers, rows)
    )


_setup = label_noise._setup


def make_plots(config, runs, out, frontier=None, kept_gain=None) -> list[str]:
    frontier = frontier if frontier is not None else analyse(runs)["frontier"]
    fig, axes = common.subplot_grid(2, ncols=2, size=5.0)
    for ax, key, label in (
        (axes[0], "gradients", "gradients per step ÷ SGD's"),
        (axes[1], "time_ratio", "measured training time ÷ SGD's"),
    ):
        for opt, f in frontier.items():
            x, acc = np.asarray(f[key]), np.asarray(f["final"])
            ax.errorbar(
                np.mean(x),
                np.mean(acc),
                xerr=np.std(x),
                yerr=np.std(acc),
                marker="o",
                capsize=3,
                label=NAMES.get(opt, opt),
            )
        ax.set_xlabel(label)
        ax.set_ylabel("final test accuracy (%)")
        common.percent_axis(ax)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{100 * v:.0f} %"))
        ax.xaxis.set_major_locator(plt.MaxNLocator(6))  # "125 %" labels need the room
        ax.grid(alpha=0.3)
    axes[0].set_title("cost counted in gradients", fontsize=10)
    axes[1].set_title("cost measured in seconds", fontsize=10)
    seeds = len(config["seeds"])
    common.figure_legend(fig, axes, note=f"error bars: mean ± 1 std over {seeds} seeds")
    path = common.save_figure(
        fig,
        os.path.join(out, "frontier.png"),
        title=f"Test accuracy against cost, 40 % symmetric noise: {_setup(config)}",
    )
    return [path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the experiment; returns ``{"config", "runs", "frontier", "table", "plots", "out"}``."""
    return common.run_experiment(
        argv,
        PRESETS,
        common.plain_text(__doc__),
        run_all,
        make_tables,
        make_plots,
        analyse=analyse,
        help=HELP,
        experiment=EXPERIMENT,
    )


if __name__ == "__main__":
    main()
