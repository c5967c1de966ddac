"""Sharpness against generalization, and scale invariance (Minimum Sharpness).

Claim tested (Ibayashi, Hamaguchi & Imaizumi, arXiv 2106.12612): Minimum Sharpness, the
Hessian trace minimised over the function-preserving rescalings of a ReLU network, is
scale-invariant and "has a valid correlation with the generalization of NNs", where the
plain trace can be moved arbitrarily by a rescaling that does not change the function.

We train a family of ReLU MLPs that differ in the fraction of shuffled training labels
(0 to 1, as in the paper: a random subset of that size has its labels permuted among
itself), in width and in learning rate, and for every network compute, on its training set
(with the labels it was trained on):

* the Hessian trace: exact (sum of the exact Hessian diagonal, which for a piecewise-linear
  network with softmax cross-entropy equals the Gauss-Newton diagonal), and the Hutchinson
  estimate as a cross-check;
* the top Hessian eigenvalue (Lanczos);
* worst-case adaptive sharpness (Andriushchenko et al., 2023; ℓ2 ball of radius ρ in the
  |w|-rescaled coordinates);
* layer-wise and node-wise Minimum Sharpness.

The generalization gap is **train accuracy − test accuracy** (train accuracy on the labels
used for training, in eval mode; the primary gap), and also test loss − train loss. We report
Kendall's τ (``scipy.stats.kendalltau``) of each measure with each gap over all networks,
and the granulated τ of Jiang et al. (2020): τ averaged over groups of networks that differ
in one hyper-parameter only.

Scale invariance: on the same trained networks, a random layer-wise rescaling
(``W_l → α_l W_l``, ``Π α_l = 1``, ``log α ~ N(0, σ²)`` centred) and a random node-wise one
(every hidden unit's incoming weights and bias × ``a``, outgoing weights ÷ ``a``,
``log a ~ N(0, σ²)``) are applied with ``sharpjax.sharpness.apply_scales``; the logits are
checked to be unchanged, and every measure is recomputed.

Presets (``--preset NAME``; override any key, e.g. ``--label_fractions 0 0.5 1``):

* ``default``: digits (1347 training images), MLPs with two hidden layers of width 32, 64 or
  128, learning rate 0.02, 0.05 or 0.1 (cosine decay, batch 64, no weight decay), label
  fractions 0/0.25/0.5/0.75/1, 2 seeds: 90 networks, 150 epochs each; about 10 min on this
  shared 2-core machine. (Width 256 works too, ``--widths 32 256``, but the exact Hessian
  diagonal then costs ~30x more per network: 35 min for 60 networks here.)
* ``tiny``: seconds, for the tests.

Outputs (``--out``, default ``runs/sharpness_generalization/<preset>/``, ignored by git; the
README's results are the stored run ``--out results/sharpness_generalization``): ``config.json``,
``runs/*.json`` (one per network: hyper-parameters, accuracies, gaps, measures before and
after the rescalings), ``summary.json``, ``table.md``, ``measures_vs_gap.png``,
``scale_invariance.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import numpy as np

EXPERIMENT = "sharpness_generalization"
# measure key -> label; the measures of the correlation table, in order.
MEASURES = {
    "trace": "Hessian trace",
    "top_eigenvalue": "top eigenvalue",
    "adaptive_sharpness": "adaptive sharpness (worst)",
    "min_sharpness_layer": "Minimum Sharpness (layer)",
    "min_sharpness_node": "Minimum Sharpness (node)",
}
GAPS = {
    "gap_accuracy": "train acc − test acc",
    "gap_loss": "test loss − train loss",
}
HYPERPARAMETERS = ("label_fraction", "width", "learning_rate")

DEFAULT: dict[str, Any] = {
    "dataset": "digits",
    "label_fractions": [0.0, 0.25, 0.5, 0.75, 1.0],
    "widths": [32, 64, 128],
    "depth": 2,
    "learning_rates": [0.02, 0.05, 0.1],
    "seeds": [0, 1],
    "epochs": 150,
    "batch_size": 64,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "lr_schedule": "cosine",
    "eval_every": 50,
    "max_steps_per_epoch": None,
    # measures
    "hutchinson_samples": 30,  # a cross-check of the exact trace only
    "lanczos_iterations": 20,
    "adaptive_rho": 0.2,
    "adaptive_steps": 20,
    "measure_examples": None,  # None: the whole training set
    # random rescalings: std of the log-scales
    "rescale_std": 1.0,
    "progress": False,
    "reuse": True,
    "out": None,
}

# What each config key means, for --help (the default of the chosen preset is added).
HELP = {
    "dataset": "digits or mnist1d (offline)",
    "label_fractions": "fractions of training examples whose labels are shuffled among them",
    "widths": "widths of the hidden layers",
    "depth": "number of hidden layers",
    "learning_rates": "peak SGD learning rates",
    "seeds": "seeds; one seed fixes the shuffled labels, the initialisation and batch order",
    "epochs": "training epochs per network",
    "batch_size": "training batch size",
    "momentum": "SGD momentum",
    "weight_decay": "decoupled weight decay",
    "lr_schedule": "learning-rate schedule: cosine or constant",
    "eval_every": "epochs between test evaluations",
    "max_steps_per_epoch": "cap on the steps of an epoch (None: the whole training set)",
    "hutchinson_samples": "Hutchinson probes of the trace estimate (a cross-check of the exact "
    "trace)",
    "lanczos_iterations": "Lanczos iterations of the top eigenvalue",
    "adaptive_rho": "radius ρ of worst-case adaptive sharpness",
    "adaptive_steps": "ascent steps of worst-case adaptive sharpness",
    "measure_examples": "training examples the measures use (None: all)",
    "rescale_std": "std of the log-scales of the random function-preserving rescalings",
    "progress": "the trainer's own per-epoch bar and lines (the overall bar is always shown)",
    "reuse": "reuse a finished network stored in OUT/runs/ when its config is identical",
    "out": "output folder",
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": DEFAULT,
    "tiny": {
        **DEFAULT,
        "label_fractions": [0.0, 1.0],
        "widths": [16],
        "learning_rates": [0.05, 0.1],
        "seeds": [0],
        "epochs": 2,
        "eval_every": 1,
        "max_steps_per_epoch": 5,
        "hutchinson_samples": 8,
        "lanczos_iterations": 5,
        "adaptive_steps": 3,
        "measure_examples": 200,
        "reuse": False,
        "out": None,
    },
}


# --------------------------------------------------------------------------------------
# Data, model, loss: hashable callables so the measures' jit caches are shared.
# --------------------------------------------------------------------------------------


def shuffle_labels(dataset, fraction: float, seed: int):
    """``dataset`` with the labels of a random ``fraction`` of training examples permuted
    among themselves (the class counts stay the same; ``fraction=1`` shuffles all labels).

    ``y_train_clean`` keeps the truth, so the library's memorisation metric still works.
    """
    rng = np.random.default_rng([seed, 2106])
    n = dataset.num_train
    chosen = rng.choice(n, size=round(fraction * n), replace=False)
    labels = dataset.y_train_clean.copy()
    labels[chosen] = rng.permutation(labels[chosen])
    return dataclasses.replace(
        dataset, y_train=labels, noise="shuffled", noise_rate=float(fraction), seed=seed
    )


@dataclasses.dataclass(frozen=True)
class MLPLogits:
    """``logits(params, x)`` of ``sharpjax.models.MLP``; hashable, so jit caches are shared."""

    hidden_sizes: tuple[int, ...]
    num_classes: int = 10

    def __call__(self, params, x):
        from sharpjax.models import MLP

        return MLP(self.num_classes, self.hidden_sizes).apply({"params": params}, x)


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """``loss(params, (x, y))``: mean softmax cross-entropy of ``logits_fn``."""

    logits_fn: MLPLogits

    def __call__(self, params, batch):
        import optax

        x, y = batch
        logits = self.logits_fn(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --------------------------------------------------------------------------------------
# Measures.
# --------------------------------------------------------------------------------------


def compute_measures(
    config: dict[str, Any], logits_fn: MLPLogits, params, x, y, key, hutchinson: bool = True
) -> dict[str, float]:
    """Every measure of :data:`MEASURES` at ``params``, and the Hutchinson estimate of the
    trace (a cross-check of the exact one) when ``hutchinson``."""
    import jax

    from sharpjax import sharpness

    loss_fn = CrossEntropy(logits_fn)
    batches = [(x, y)]
    k_trace, k_eig = jax.random.split(key)
    layer = sharpness.minimum_sharpness(logits_fn, params, (x, y), granularity="layer")
    node = sharpness.minimum_sharpness(logits_fn, params, (x, y), granularity="node")
    top = sharpness.top_eigenvalues(
        loss_fn, params, k_eig, k=1, num_iterations=config["lanczos_iterations"], batches=batches
    )
    adaptive = sharpness.adaptive_sharpness(
        loss_fn,
        params,
        rho=config["adaptive_rho"],
        kind="worst",
        num_steps=config["adaptive_steps"],
        batches=batches,
    )
    out = {
        "trace": float(layer.trace),
        "top_eigenvalue": float(top.value[0]),
        "adaptive_sharpness": float(adaptive.value),
        "min_sharpness_layer": float(layer.value),
        "min_sharpness_node": float(node.value),
        "newton_steps_layer": int(layer.num_steps),
        "newton_steps_node": int(node.num_steps),
    }
    if hutchinson:
        estimate = sharpness.hessian_trace(
            loss_fn, params, k_trace, num_samples=config["hutchinson_samples"], batches=batches
        )
        out["trace_hutchinson"] = float(estimate.value)
        out["trace_hutchinson_std_error"] = float(estimate.std_error)
    return out


def random_rescaling(params, granularity: str, std: float, seed: int):
    """A random function-preserving rescaling of an MLP's ``Dense_*`` layers.

    ``"layer"``: ``log α_l ~ N(0, std²)``, centred so that ``Π α_l = 1``. ``"node"``: one
    ``log a ~ N(0, std²)`` per hidden unit. Applied with ``sharpness.apply_scales``.
    """
    import jax.numpy as jnp

    from sharpjax import sharpness

    rng = np.random.default_rng([seed, 7])
    names = list(params)
    if granularity == "layer":
        s = rng.normal(0.0, std, len(names))
        log_scales: Any = jnp.asarray(s - s.mean(), jnp.float32)
    else:
        log_scales = tuple(
            jnp.asarray(rng.normal(0.0, std, params[name]["kernel"].shape[-1]), jnp.float32)
            for name in names[:-1]
        )
    fake = sharpness.MinimumSharpnessResult(
        value=jnp.zeros(()), trace=jnp.zeros(()), log_scales=log_scales, num_steps=jnp.zeros(())
    )
    return sharpness.apply_scales(params, fake)


# --------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------


def network_grid(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict of hyper-parameters per network."""
    return [
        {"label_fraction": float(f), "width": int(w), "learning_rate": float(lr), "seed": int(s)}
        for s, f, w, lr in itertools.product(
            config["seeds"], config["label_fractions"], config["widths"], config["learning_rates"]
        )
    ]


def run_id(h: dict[str, Any]) -> str:
    return f"frac{h['label_fraction']:g}__w{h['width']}__lr{h['learning_rate']:g}__seed{h['seed']}"


def train_and_measure(config: dict[str, Any], h: dict[str, Any], base_dataset) -> dict[str, Any]:
    """Trains one network, measures it, rescales it twice and measures again."""
    import jax
    import jax.numpy as jnp
    import optax

    from sharpjax.train import TrainConfig, train

    dataset = shuffle_labels(base_dataset, h["label_fraction"], h["seed"])
    hidden = (h["width"],) * config["depth"]
    tc = TrainConfig(
        dataset=config["dataset"],
        model="mlp",
        model_kwargs={"hidden_sizes": list(hidden)},
        optimizer="sgd",
        learning_rate=h["learning_rate"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"],
        lr_schedule=config["lr_schedule"],
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        eval_every=config["eval_every"],
        seed=h["seed"],
        max_steps_per_epoch=config["max_steps_per_epoch"],
        progress=config["progress"],
    )
    watch = common.Stopwatch()
    result = train(tc, dataset)
    train_seconds = watch.seconds

    logits_fn = MLPLogits(hidden, dataset.num_classes)
    params = result.params
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)

    def accuracy_and_loss(x, y):
        logits = logits_fn(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return float(jnp.mean(jnp.argmax(logits, -1) == y)), float(loss)

    train_acc, train_loss = accuracy_and_loss(x_train, y_train)
    test_acc, test_loss = accuracy_and_loss(x_test, y_test)

    n = config["measure_examples"] or len(x_train)
    xm, ym = x_train[:n], y_train[:n]
    key = jax.random.key(h["seed"])
    watch = common.Stopwatch()
    measures = {"original": compute_measures(config, logits_fn, params, xm, ym, key)}
    max_logit_change = {}
    reference = logits_fn(params, xm)
    for granularity in ("layer", "node"):
        scaled = random_rescaling(params, granularity, config["rescale_std"], h["seed"])
        change = jnp.max(jnp.abs(logits_fn(scaled, xm) - reference))
        max_logit_change[granularity] = float(change / jnp.max(jnp.abs(reference)))
        measures[f"{granularity}_rescaled"] = compute_measures(
            config, logits_fn, scaled, xm, ym, key, hutchinson=False
        )
    return {
        "id": run_id(h),
        **h,
        "train_accuracy": train_acc,
        "train_loss": train_loss,
        "train_accuracy_clean": result.final.get("train_accuracy_clean"),
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "gap_accuracy": train_acc - test_acc,
        "gap_loss": test_loss - train_loss,
        "measures": measures,
        "relative_logit_change": max_logit_change,
        "train_seconds": train_seconds,
        "measure_seconds": watch.seconds,
    }


def run_all(config: dict[str, Any], out: str) -> list[dict[str, Any]]:
    from sharpjax.data import load_dataset

    base = load_dataset(config["dataset"])
    grid = network_grid(config)
    keys = [k for k in DEFAULT if k not in ("progress", "reuse", "out")]
    progress = common.RunProgress(len(grid), "sharpness vs generalization")
    compiled: set[int] = set()  # widths whose programs this process has compiled
    runs = []
    for h in grid:
        run_config = {**{k: config[k] for k in keys}, **h}
        path = os.path.join(out, "runs", f"{run_id(h)}.json")
        name = (
            f"shuffled {h['label_fraction']:g}, width {h['width']}, "
            f"lr {h['learning_rate']:g}, seed {h['seed']}"
        )
        cached = common.load_cached_run(path, run_config) if config["reuse"] else None
        if cached is not None:
            progress.reused(name)
            runs.append({**cached, "reused": True})
            continue
        # The widths differ in their programs; the first network of a width compiles.
        progress.start(name, compiling=h["width"] not in compiled)
        record = train_and_measure(config, h, base)
        record = common.jsonable({**record, "run_config": run_config}, digits=9)
        common.write_json(path, record)
        runs.append(record)
        m = record["measures"]["original"]
        progress.finish(
            f"{name}: "
            f"train {100 * record['train_accuracy']:.1f}%, "
            f"test {100 * record['test_accuracy']:.1f}%, trace {m['trace']:.3g}, "
            f"MinSharp layer {m['min_sharpness_layer']:.3g} node {m['min_sharpness_node']:.3g} "
            f"({record['train_seconds']:.0f} s + {record['measure_seconds']:.0f} s)"
        )
        compiled.add(h["width"])
    progress.close()
    return runs


# --------------------------------------------------------------------------------------
# Statistics, table, plots.
# --------------------------------------------------------------------------------------


def kendall(xs, ys) -> tuple[float, float]:
    """Kendall's τ-b and its two-sided p-value (NaN when undefined)."""
    from scipy.stats import kendalltau

    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if len(xs) < 2 or np.all(xs == xs[0]) or np.all(ys == ys[0]):
        return float("nan"), float("nan")
    result = kendalltau(xs, ys)
    return float(result.statistic), float(result.pvalue)


def granulated_tau(runs, measure: str, gap: str, varied: str) -> float:
    """Mean τ over groups of networks equal in every hyper-parameter (and seed) but ``varied``."""
    others = [k for k in (*HYPERPARAMETERS, "seed") if k != varied]
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in others), []).append(r)
    taus = [
        kendall([r["measures"]["original"][measure] for r in g], [r[gap] for r in g])[0]
        for g in groups.values()
        if len({r[varied] for r in g}) > 1
    ]
    taus = [t for t in taus if np.isfinite(t)]
    return float(np.mean(taus)) if taus else float("nan")


def correlations(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{measure: {gap: {"tau", "p", "granulated": {hyper-parameter: τ}}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for measure in MEASURES:
        values = [r["measures"]["original"][measure] for r in runs]
        out[measure] = {}
        for gap in GAPS:
            tau, p = kendall(values, [r[gap] for r in runs])
            out[measure][gap] = {
                "tau": tau,
                "p": p,
                "granulated": {h: granulated_tau(runs, measure, gap, h) for h in HYPERPARAMETERS},
            }
    return out


def invariance(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per measure and rescaling: median of after/before and the largest |after/before − 1|."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for measure in MEASURES:
        out[measure] = {}
        for kind in ("layer_rescaled", "node_rescaled"):
            ratios = np.asarray(
                [r["measures"][kind][measure] / r["measures"]["original"][measure] for r in runs],
                np.float64,
            )
            out[measure][kind] = {
                "median_ratio": float(np.median(ratios)),
                "min_ratio": float(np.min(ratios)),
                "max_ratio": float(np.max(ratios)),
                "max_relative_change": float(np.max(np.abs(ratios - 1))),
            }
    return out


def _fmt(x: float, digits: int = 2) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def make_tables(config, runs, correlations, invariance) -> str:
    """``table.md``: the correlation table, the invariance table and the family's summary."""
    n = len(runs)
    corr_rows = []
    for measure, label in MEASURES.items():
        c = correlations[measure]
        corr_rows.append(
            [
                label,
                f"{_fmt(c['gap_accuracy']['tau'])} (p={c['gap_accuracy']['p']:.1g})",
                *(_fmt(c["gap_accuracy"]["granulated"][h]) for h in HYPERPARAMETERS),
                f"{_fmt(c['gap_loss']['tau'])} (p={c['gap_loss']['p']:.1g})",
            ]
        )
    inv_rows = []
    for measure, label in MEASURES.items():
        before = np.median([r["measures"]["original"][measure] for r in runs])
        cells = [label, f"{before:.4g}"]
        for kind in ("layer_rescaled", "node_rescaled"):
            s = invariance[measure][kind]
            cells += [
                f"{s['median_ratio']:.4g} [{s['min_ratio']:.3g}, {s['max_ratio']:.3g}]",
                f"{s['max_relative_change']:.1e}",
            ]
        inv_rows.append(cells)
    logit_change = {k: max(r["relative_logit_change"][k] for r in runs) for k in ("layer", "node")}

    family_rows = []
    for f in config["label_fractions"]:
        sel = [r for r in runs if np.isclose(r["label_fraction"], f)]
        family_rows.append(
            [
                f"{f:g}",
                common.fmt_mean_std(r["train_accuracy"] for r in sel),
                common.fmt_mean_std(r["test_accuracy"] for r in sel),
                common.fmt_mean_std(r["gap_accuracy"] for r in sel),
                f"{np.median([r['measures']['original']['trace'] for r in sel]):.3g}",
                f"{np.median([r['measures']['original']['min_sharpness_layer'] for r in sel]):.3g}",
                f"{np.median([r['measures']['original']['min_sharpness_node'] for r in sel]):.3g}",
            ]
        )
    rel = np.asarray(
        [
            abs(
                r["measures"]["original"]["trace_hutchinson"] / r["measures"]["original"]["trace"]
                - 1
            )
            for r in runs
        ]
    )
    cross_check = (
        f"Cross-check of the exact trace: Hutchinson's estimate ({config['hutchinson_samples']} "
        f"probes) differs from it by {100 * np.median(rel):.1f} % (median) and "
        f"{100 * rel.max():.1f} % (max) over the {n} networks.\n"
    )
    return "\n".join(
        [
            f"# Sharpness and generalization: {n} ReLU MLPs on {config['dataset']}\n",
            f"Family: shuffled-label fraction {config['label_fractions']}, widths "
            f"{config['widths']} (depth {config['depth']}), learning rates "
            f"{config['learning_rates']}, seeds {config['seeds']}; {config['epochs']} epochs of "
            "SGD (momentum 0.9). Measures on the training set with the training labels.\n",
            "## Kendall's τ of each measure with the generalization gap\n",
            "Gap = train accuracy − test accuracy (primary), and test loss − train loss "
            "(last column). Granulated τ: mean τ over groups that differ only in the named "
            "hyper-parameter (Jiang et al., 2020).\n",
            common.markdown_table(
                [
                    "measure",
                    "τ (acc gap), all",
                    "τ, label fraction varies",
                    "τ, width varies",
                    "τ, lr varies",
                    "τ (loss gap), all",
                ],
                corr_rows,
            ),
            "## Scale invariance: measures after a random function-preserving rescaling\n",
            f"Ratio after/before over the {n} networks: median [min, max], and the largest "
            f"|after/before − 1|. Rescaling log-scales ~ N(0, {config['rescale_std']:g}²); "
            "the largest relative change of the logits was "
            f"{logit_change['layer']:.1e} (layer) and {logit_change['node']:.1e} (node).\n",
            common.markdown_table(
                [
                    "measure",
                    "median before",
                    "layer-wise: after/before",
                    "max rel. change",
                    "node-wise: after/before",
                    "max rel. change",
                ],
                inv_rows,
            ),
            "## The family by shuffled-label fraction\n",
            "Accuracies in % (mean ± std over widths, learning rates and seeds); measures: "
            "median.\n",
            common.markdown_table(
                [
                    "shuffled fraction",
                    "train acc",
                    "test acc",
                    "gap (pp)",
                    "trace",
                    "MinSharp layer",
                    "MinSharp node",
                ],
                family_rows,
            ),
            cross_check,
        ]
    )


def _setup(config: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """``"digits, 90 ReLU MLPs (2 hidden layers), 150 epochs"``: what a plot's title names."""
    return (
        f"{config['dataset']}, {len(runs)} ReLU MLPs ({config['depth']} hidden layers), "
        f"{config['epochs']} epochs"
    )


def make_plots(config, runs, out: str, correlations, invariance) -> list[str]:
    """Scatter of every measure against the accuracy gap (τ in the title), and the
    before/after-rescaling scatter of trace and Minimum Sharpness."""
    import matplotlib.pyplot as plt

    fractions = sorted({r["label_fraction"] for r in runs})
    widths = sorted({r["width"] for r in runs})
    markers = dict(zip(widths, "osD^v<>", strict=False))
    cmap = plt.get_cmap("viridis")
    color = {f: cmap(i / max(1, len(fractions) - 1)) for i, f in enumerate(fractions)}
    size = {lr: 10 + 18 * i for i, lr in enumerate(sorted({r["learning_rate"] for r in runs}))}

    fig, axes = common.subplot_grid(len(MEASURES), ncols=3)
    for ax, (measure, label) in zip(axes, MEASURES.items(), strict=False):
        for r in runs:
            value = r["measures"]["original"][measure]
            ax.scatter(
                value,
                100 * r["gap_accuracy"],
                color=color[r["label_fraction"]],
                marker=markers[r["width"]],
                s=size[r["learning_rate"]],
                edgecolors="k",
                linewidths=0.3,
            )
        if all(r["measures"]["original"][measure] > 0 for r in runs):
            ax.set_xscale("log")
        tau = correlations[measure]["gap_accuracy"]["tau"]
        ax.set_title(f"{label}\nτ = {_fmt(tau)}", fontsize=9)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("train acc − test acc (pp)", fontsize=8)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=color[f], label=f"shuffled {f:g}")
        for f in fractions
    ] + [
        plt.Line2D([], [], marker=markers[w], ls="", color="grey", label=f"width {w}")
        for w in widths
    ]
    handles += [
        plt.Line2D(
            [], [], marker="o", ls="", color="w", markeredgecolor="k", label=f"lr {lr:g}",
            markersize=math.sqrt(area),
        )
        for lr, area in size.items()
    ]  # fmt: skip
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(handles), 6),
        fontsize=9,
        frameon=False,
    )
    setup = _setup(config, runs)
    paths = [
        common.save_figure(
            fig,
            os.path.join(out, "measures_vs_gap.png"),
            title=f"Generalization gap against each sharpness measure: {setup}",
        )
    ]

    shown = ("trace", "min_sharpness_layer", "min_sharpness_node", "top_eigenvalue")
    fig, axes = common.subplot_grid(len(shown), ncols=4, size=3.6)
    for ax, measure in zip(axes, shown, strict=True):
        before = [r["measures"]["original"][measure] for r in runs]
        for kind, mark in (("layer_rescaled", "o"), ("node_rescaled", "x")):
            after = [r["measures"][kind][measure] for r in runs]
            ax.scatter(before, after, marker=mark, s=16, label=kind.replace("_", " "))
        lo, hi = min(before), max(before)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(MEASURES[measure], fontsize=9)
        ax.set_xlabel("before")
        ax.set_ylabel("after rescaling")
        ax.grid(alpha=0.3)
    common.figure_legend(fig, axes, note=None)
    paths.append(
        common.save_figure(
            fig,
            os.path.join(out, "scale_invariance.png"),
            title=f"Measures before and after a function-preserving rescaling: {setup}",
        )
    )
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the experiment; returns ``{"config", "runs", "correlations", "invariance", "table",
    "plots", "out"}``."""
    return common.run_experiment(
        argv,
        PRESETS,
        common.plain_text(__doc__),
        run_all,
        make_tables,
        make_plots,
        analyse=lambda runs: {"correlations": correlations(runs), "invariance": invariance(runs)},
        seconds=lambda r: r["train_seconds"] + r["measure_seconds"],
        help=HELP,
        experiment=EXPERIMENT,
    )


if __name__ == "__main__":
    main()
