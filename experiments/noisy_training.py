"""Training under added noise: SGD, SAM and noise-resistant SAM (the privacy setting).

Claim tested (Su, Jin & Wang, Neural Networks 181, 2024; see docs/algorithms.md): "additive
noises would inevitably degrade the generalization and robustness of the model"; the
noise-resistant SAM (SAM followed by integral feedback, ``sharpjax.noise_resistant``) keeps
better accuracy than SAM when noise is added to the model. Three disturbances, each over a
grid of scales, each a ``TrainConfig`` field of the library's loop:

* ``grad_noise_std``: Gaussian noise on every gradient evaluation (DP-SGD-like; the clean and
  the second gradient of a SAM step each get their own draw);
* ``param_noise_std``: Gaussian noise added to every parameter after each step;
* ``param_bias``: a constant added to every parameter after each step: the constant
  disturbance that the integral term of the noise-resistant rule is designed to cancel, so
  the setting where it should matter most.

The learning rate is constant (no decay), so a disturbance weighs the same at every step and
the bias has a fixed point to settle at (with a decaying rate, ``bias / lr`` grows without
bound at the end of training for every method alike).

Presets (``--preset NAME``; any key can be overridden, e.g. ``--seeds 0 1 2 --mu 0.001``):

* ``default``: the offline experiment of the README. scikit-learn digits (1347 training
  images) with an MLP (128-128), 40 epochs at batch 64 and constant lr 0.05, 5 seeds, three
  scales per disturbance plus the undisturbed baseline; SGD, SAM (ρ = 0.05) and noise-resistant
  SAM with μ = 0.001 and μ = 0.01: 4 × 10 × 5 = 200 short runs, about 6-12 min on this shared
  2-core machine. (Every run compiles its own train step, because the noise scale and the
  seed are constants of the step; a small MLP keeps that cheap.)
* ``mnist1d``: the same on mnist1d with the 1-D CNN (slower).
* ``tiny``: seconds, for the tests.

Noise-resistant SAM's μ is UNVERIFIED in the library (``sharpjax.noise_resistant``): the paper's
value could not be read; ``mu`` sets it (a list runs one row per value).

Outputs (``--out``, default ``runs/noisy_training/<preset>/``, ignored by git; the README's
results are the stored run ``--out results/noisy_training``): ``config.json``, ``runs/*.json``
(one per run, with its per-epoch history), ``summary.json`` (every run with its history;
enough for ``--report``), ``table.md``, ``accuracy_vs_noise.png``, ``bias_curves.png``.

    python experiments/noisy_training.py --preset default --out results/noisy_training
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import numpy as np

EXPERIMENT = "noisy_training"
DISTURBANCES = ("grad_noise_std", "param_noise_std", "param_bias")
DISTURBANCE_LABELS = {
    "grad_noise_std": "gradient noise σ",
    "param_noise_std": "parameter noise σ",
    "param_bias": "parameter bias b",
}
LAST_EPOCHS = 5
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy")

DEFAULT: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",
    "model_kwargs": {"hidden_sizes": [128, 128]},
    "optimizers": ["sgd", "sam", "noise_resistant_sam"],
    "mu": [0.001, 0.01],
    "rho": 0.05,
    # the grids; the undisturbed baseline is always run
    "grad_noise_std": [0.01, 0.03, 0.1],
    "param_noise_std": [0.003, 0.01, 0.03],
    "param_bias": [1e-4, 3e-4, 1e-3],
    "seeds": [0, 1, 2, 3, 4],
    "epochs": 40,
    "batch_size": 64,
    "learning_rate": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "constant",
    "max_steps_per_epoch": None,
    "progress": False,
    "reuse": True,
    "out": None,
}

# What each config key means, for --help (the default of the chosen preset is added).
HELP = {
    "dataset": "digits or mnist1d (offline)",
    "model": "model name of sharpjax.models.get_model (mlp, cnn1d, lenet, ...)",
    "model_kwargs": "JSON keyword arguments of the model",
    "optimizers": "methods: sgd, sam, noise_resistant_sam (one row per value of --mu)",
    "mu": "noise-resistant SAM's integral-feedback gain μ (one row per value)",
    "rho": "SAM's perturbation radius (also inside noise-resistant SAM)",
    "grad_noise_std": "scales of the Gaussian noise added to every gradient",
    "param_noise_std": "scales of the Gaussian noise added to the parameters after each step",
    "param_bias": "constants added to every parameter after each step",
    "seeds": "seeds; one seed fixes the initialisation, the batch order and the noise draws",
    "epochs": "training epochs per run",
    "batch_size": "training batch size",
    "learning_rate": "SGD learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "decoupled weight decay",
    "lr_schedule": "learning-rate schedule: constant or cosine",
    "max_steps_per_epoch": "cap on the steps of an epoch (None: the whole training set)",
    "progress": "the trainer's own per-epoch bar and lines (the overall bar is always shown)",
    "reuse": "reuse a finished run stored in OUT/runs/ when its config is identical",
    "out": "output folder",
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": DEFAULT,
    "mnist1d": {
        **DEFAULT,
        "dataset": "mnist1d",
        "model": "cnn1d",
        "model_kwargs": {},
        "batch_size": 128,
        "learning_rate": 0.05,
        "epochs": 30,
        "seeds": [0, 1, 2],
        "out": None,
    },
    "tiny": {
        **DEFAULT,
        "model_kwargs": {"hidden_sizes": [16]},
        "mu": [0.01],
        "grad_noise_std": [0.05],
        "param_noise_std": [0.003],
        "param_bias": [1e-3],
        "seeds": [0],
        "epochs": 2,
        "max_steps_per_epoch": 3,
        "reuse": False,
        "out": None,
    },
}


# --------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------


def settings(config: dict[str, Any]) -> list[tuple[str, float]]:
    """``(disturbance, scale)`` pairs; ``("none", 0.0)`` is the undisturbed baseline."""
    out = [("none", 0.0)]
    for name in DISTURBANCES:
        out += [(name, float(scale)) for scale in config[name]]
    return out


def methods(config: dict[str, Any]) -> list[tuple[str, float | None]]:
    """``(optimizer, mu)`` rows; mu is None except for noise-resistant SAM."""
    rows = []
    for opt in config["optimizers"]:
        if opt == "noise_resistant_sam":
            rows += [(opt, float(mu)) for mu in config["mu"]]
        else:
            rows.append((opt, None))
    return rows


def method_label(opt: str, mu: float | None) -> str:
    names = {"sgd": "SGD", "sam": "SAM", "noise_resistant_sam": "noise-resistant SAM"}
    label = names.get(opt, opt)
    return f"{label} (μ={mu:g})" if mu is not None else label


def setting_label(name: str, scale: float) -> str:
    if name == "none":
        return "none"
    short = {"grad_noise_std": "grad σ", "param_noise_std": "param σ", "param_bias": "bias"}
    return f"{short[name]}={scale:g}"


def run_id(opt: str, mu: float | None, name: str, scale: float, seed: int) -> str:
    tag = opt if mu is None else f"{opt}_mu{mu:g}"
    return f"{tag}__{name}{scale:g}__seed{seed}"


def train_config(config, opt: str, mu: float | None, name: str, scale: float, seed: int):
    """The ``TrainConfig`` of one run."""
    from sharpjax.train import TrainConfig

    disturbance = {d: (scale if d == name else 0.0) for d in DISTURBANCES}
    return TrainConfig(
        dataset=config["dataset"],
        model=config["model"],
        model_kwargs=dict(config["model_kwargs"]),
        optimizer=opt,
        rho=None if opt == "sgd" else config["rho"],
        mu=mu if mu is not None else 0.01,
        learning_rate=config["learning_rate"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"],
        lr_schedule=config["lr_schedule"],
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        seed=seed,
        max_steps_per_epoch=config["max_steps_per_epoch"],
        progress=config["progress"],
        **disturbance,
    )


def run_all(config: dict[str, Any], out: str) -> list[dict[str, Any]]:
    """Every (method, disturbance, seed) run, reusing stored identical runs when ``reuse``."""
    import jax

    from sharpjax.data import load_dataset
    from sharpjax.train import train

    dataset = load_dataset(config["dataset"])
    grid = [
        (opt, mu, name, scale, seed)
        for seed in config["seeds"]
        for name, scale in settings(config)
        for opt, mu in methods(config)
    ]
    progress = common.RunProgress(len(grid), f"noisy training, {config['dataset']}")
    runs = []
    for opt, mu, name, scale, seed in grid:
        tc = train_config(config, opt, mu, name, scale, seed)
        run_config = {k: v for k, v in tc.to_dict().items() if k not in ("progress", "workdir")}
        rid = run_id(opt, mu, name, scale, seed)
        path = os.path.join(out, "runs", f"{rid}.json")
        header = f"{method_label(opt, mu)}, {setting_label(name, scale)}, seed {seed}"
        cached = common.load_cached_run(path, run_config) if config["reuse"] else None
        if cached is not None:
            accuracy = 100 * (cached["final_test_accuracy"] or 0)
            progress.reused(f"{header}: final test accuracy {accuracy:.1f}%")
            runs.append({**cached, "reused": True})
            continue
        # Every run compiles its own step: the noise scale and the seed are constants of it.
        progress.start(header, compiling=True)
        watch = common.Stopwatch()
        result = train(tc, dataset)
        history = [{k: h.get(k) for k in HISTORY_KEYS} for h in result.history]
        tests = [h["test_accuracy"] for h in history if h["test_accuracy"] is not None]
        record = common.jsonable(
            {
                "id": rid,
                "optimizer": opt,
                "mu": mu,
                "disturbance": name,
                "scale": scale,
                "seed": seed,
                "run_config": run_config,
                "final_test_accuracy": history[-1]["test_accuracy"],
                "best_test_accuracy": max(tests) if tests else None,
                "final_test_loss": history[-1]["test_loss"],
                "final_train_loss": history[-1]["train_loss"],
                # the mean of all parameters: where a constant bias pushes them
                "final_param_mean": float(
                    np.mean(np.concatenate([np.ravel(x) for x in jax.tree.leaves(result.params)]))
                ),
                "wall_seconds": watch.seconds,
                "history": history,
            }
        )
        common.write_json(path, record)
        runs.append(record)
        progress.finish(
            f"{header}: final test accuracy {100 * (record['final_test_accuracy'] or 0):.1f}% "
            f"({record['wall_seconds']:.1f} s)"
        )
    progress.close()
    return runs


# --------------------------------------------------------------------------------------
# Table and plots.
# --------------------------------------------------------------------------------------


def _select(runs, opt, mu, name, scale):
    return [
        r
        for r in runs
        if r["optimizer"] == opt
        and r["mu"] == mu
        and r["disturbance"] == name
        and np.isclose(r["scale"], scale)
    ]


def last_epochs_accuracy(run: dict[str, Any], k: int = LAST_EPOCHS) -> float | None:
    """Mean test accuracy over the last ``k`` evaluated epochs (less noisy than the last one
    under a constant learning rate)."""
    history = run.get("history") or []  # summaries written before histories were kept
    tests = [h["test_accuracy"] for h in history if h["test_accuracy"] is not None]
    return float(np.mean(tests[-k:])) if tests else None


def make_tables(config: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """``table.md``: test accuracy (final, and mean of the last epochs) and its paired
    difference to SAM, methods × settings; the parameter drift under the constant bias."""
    columns = settings(config)
    headers = ["method"] + [setting_label(n, s) for n, s in columns]
    runs = [{**r, "last_epochs_test_accuracy": last_epochs_accuracy(r)} for r in runs]

    def accuracy_rows(key: str) -> list[list[str]]:
        return [
            [
                method_label(opt, mu),
                *(
                    common.fmt_mean_std(r[key] for r in _select(runs, opt, mu, n, s))
                    for n, s in columns
                ),
            ]
            for opt, mu in methods(config)
        ]

    def difference_rows(key: str) -> list[list[str]]:
        """Paired by seed: each method minus SAM on the same seed and setting."""
        return [
            [
                f"{method_label(opt, mu)} − SAM",
                *(
                    common.fmt_mean_std(
                        common.paired_differences(
                            _select(runs, opt, mu, n, s), _select(runs, "sam", None, n, s), key
                        )
                    )
                    for n, s in columns
                ),
            ]
            for opt, mu in methods(config)
            if opt != "sam"
        ]

    # Where the constant bias leaves the parameters: their mean at the end of training.
    bias_columns = [("none", 0.0)] + [("param_bias", float(b)) for b in config["param_bias"]]
    drift_rows = [
        [
            method_label(opt, mu),
            *(
                common.fmt_mean_std(
                    (r["final_param_mean"] for r in _select(runs, opt, mu, n, s)), scale=1e3
                )
                for n, s in bias_columns
            ),
        ]
        for opt, mu in methods(config)
    ]

    seeds = len(config["seeds"])
    parts = [
        f"# Noisy training: {config['dataset']}, {config['model']}, {config['epochs']} epochs, "
        f"{seeds} seeds, constant lr {config['learning_rate']:g}\n",
        "## Final test accuracy (%)\n",
        "Mean ± std over seeds. grad σ: Gaussian noise on every "
        "gradient; param σ: Gaussian noise on the parameters after every step; bias: a "
        "constant added to every parameter after every step.\n",
        common.markdown_table(headers, accuracy_rows("final_test_accuracy")),
        "## Final test accuracy: difference to SAM (percentage points, paired by seed)\n",
        common.markdown_table(headers, difference_rows("final_test_accuracy")),
        f"## Mean test accuracy over the last {LAST_EPOCHS} epochs (%)\n",
        "With a constant learning rate the last epoch is one noisy sample; this averages the "
        f"last {LAST_EPOCHS} evaluations of each run, then over seeds.\n",
        common.markdown_table(headers, accuracy_rows("last_epochs_test_accuracy")),
        f"## Last-{LAST_EPOCHS}-epoch accuracy: difference to SAM (pp, paired by seed)\n",
        common.markdown_table(headers, difference_rows("last_epochs_test_accuracy")),
        "## Mean parameter value at the end of training (×10⁻³), constant-bias settings\n",
        "A constant bias b is added to every parameter after every step (b × steps in all, "
        "if nothing pushed back). The integral term of noise-resistant SAM is meant to cancel "
        "it, but it sums gradients, so it can only push back along directions in which the "
        "loss changes; along flat ones (e.g. weights of always-zero input pixels) the bias "
        "accumulates for every method.\n",
        common.markdown_table(
            ["method", *(setting_label(n, s) for n, s in bias_columns)], drift_rows
        ),
    ]
    return "\n".join(parts)


def _setup(config: dict[str, Any]) -> str:
    """``"digits, mlp, 40 epochs, constant lr 0.05"``: what a plot's title names."""
    return (
        f"{config['dataset']}, {config['model']}, {config['epochs']} epochs, "
        f"constant lr {config['learning_rate']:g}"
    )


def make_plots(config: dict[str, Any], runs: list[dict[str, Any]], out: str) -> list[str]:
    """Final accuracy against each disturbance's scale; test accuracy curves under bias (when
    the runs carry their histories)."""
    paths = []
    fig, axes = common.subplot_grid(len(DISTURBANCES), ncols=3)
    for ax, name in zip(axes, DISTURBANCES, strict=True):
        for opt, mu in methods(config):
            scales = [0.0, *config[name]]
            stats = [
                common.mean_std(
                    r["final_test_accuracy"]
                    for r in _select(runs, opt, mu, "none" if s == 0 else name, s)
                )
                for s in scales
            ]
            points = [(x, m, sd) for x, (m, sd, n) in zip(scales, stats, strict=True) if n]
            if not points:
                continue
            xs, ms, sds = map(np.asarray, zip(*points, strict=True))
            ax.errorbar(
                np.arange(len(xs)), ms, yerr=sds, marker="o", capsize=3, label=method_label(opt, mu)
            )
            ax.set_xticks(np.arange(len(xs)), [f"{x:g}" for x in xs])
        ax.set_xlabel(DISTURBANCE_LABELS[name])
        ax.set_ylabel("final test accuracy (%)")
        common.percent_axis(ax)
        ax.grid(alpha=0.3)
    seeds = len(config["seeds"])
    common.figure_legend(fig, axes, note=f"error bars: mean ± 1 std over {seeds} seeds")
    paths.append(
        common.save_figure(
            fig,
            os.path.join(out, "accuracy_vs_noise.png"),
            title=f"Final test accuracy against added noise: {_setup(config)}",
        )
    )

    biases = config["param_bias"]
    if biases and common.have_histories(runs):
        fig, axes = common.subplot_grid(len(biases))
        for ax, scale in zip(axes, biases, strict=False):
            for opt, mu in methods(config):
                selected = _select(runs, opt, mu, "param_bias", scale)
                if not selected:
                    continue
                epochs = [h["epoch"] for h in selected[0]["history"]]
                curves = [[h["test_accuracy"] for h in r["history"]] for r in selected]
                common.plot_band(ax, epochs, curves, label=method_label(opt, mu))
            ax.set_title(f"bias b={scale:g} added per step", fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy (%)")
            common.percent_axis(ax)
            ax.grid(alpha=0.3)
        common.figure_legend(fig, axes, note=common.band_note(len(config["seeds"])))
        paths.append(
            common.save_figure(
                fig,
                os.path.join(out, "bias_curves.png"),
                title=f"Test accuracy under a constant parameter bias: {_setup(config)}",
            )
        )
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the experiment; returns ``{"config", "runs", "table", "plots", "out"}``."""
    return common.run_experiment(
        argv,
        PRESETS,
        common.plain_text(__doc__),
        run_all,
        make_tables,
        make_plots,
        help=HELP,
        experiment=EXPERIMENT,
    )


if __name__ == "__main__":
    main()
