"""The experiment scripts end to end at ``--preset tiny``: files, tables, JSON and PNGs.

Each script runs in-process through its ``main(argv)`` into a temporary folder; we then read
what it wrote (not only its exit), so a script that runs but writes an empty table, NaNs or a
broken PNG fails here.
"""

from __future__ import annotations

import math
import os
import sys

import pytest

EXPERIMENTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"
)
sys.path.insert(0, EXPERIMENTS)

import common  # noqa: E402
import label_noise  # noqa: E402
import noisy_training  # noqa: E402
import sharpness_generalization  # noqa: E402
from benchmarks import harness, legacy  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402
from benchmarks import steps as bench_steps  # noqa: E402


def table_rows(markdown: str, section: str | None = None) -> list[list[str]]:
    """The rows (header first) of the first markdown table after the heading ``section``."""
    lines = markdown.splitlines()
    if section is not None:
        lines = lines[next(i for i, line in enumerate(lines) if line.startswith(section)) :]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not all(set(c) <= set(":-") for c in cells):  # skip the alignment row
            rows.append(cells)
    return rows


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def all_finite(value) -> bool:
    """True when every number in a JSON value is finite (None allowed)."""
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def check_pngs(paths, folder):
    assert paths
    for path in paths:
        assert os.path.dirname(os.path.abspath(path)) == os.path.abspath(folder)
        assert common.is_png(path), path
        assert os.path.getsize(path) > 2000, path  # a real figure, not an empty canvas


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def test_parse_config_presets_and_overrides():
    presets = {"default": {"a": 1, "b": [0, 1], "c": "x", "d": None, "e": True, "f": 0.5}}
    config = common.parse_config(
        ["--a", "3", "--b", "4", "5", "--d", "7", "--e", "false", "--f=2"], presets, "t"
    )
    assert config == {"a": 3, "b": [4, 5], "c": "x", "d": 7, "e": False, "f": 2.0,
                      "preset": "default", "report": False}  # fmt: skip
    with pytest.raises(SystemExit):
        common.parse_config(["--nope", "1"], presets, "t")
    with pytest.raises(SystemExit):
        common.parse_config(["--preset", "missing"], presets, "t")


def test_parse_config_default_out_and_help(monkeypatch, tmp_path, capsys):
    presets = {"default": {"a": 1, "out": None}, "other": {"a": 2, "out": None}}
    help = {"a": "the number of apples", "out": "output folder"}
    monkeypatch.setenv("SHARPJAX_RUNS", str(tmp_path))
    config = common.parse_config(["--preset", "other"], presets, "t", help=help, experiment="e")
    assert config["out"] == os.path.join(str(tmp_path), "e", "other")
    monkeypatch.delenv("SHARPJAX_RUNS")
    config = common.parse_config([], presets, "t", help=help, experiment="e")
    assert config["out"] == os.path.join(common.REPO_ROOT, "runs", "e", "default")
    # an explicit --out is a string even when it looks like a number
    assert common.parse_config(["--out", "7"], presets, "t", help=help)["out"] == "7"
    with pytest.raises(ValueError, match="no help text"):
        common.parse_config([], presets, "t", help={"a": "apples"})
    with pytest.raises(SystemExit):
        common.parse_config(["--help"], presets, "t", help=help, experiment="e")
    text = capsys.readouterr().out
    assert "the number of apples (default: 1)" in text and "--report" in text


def test_runs_directory_is_ignored_by_git():
    """The default output folder of every experiment must not dirty the checkout."""
    import subprocess

    probe = os.path.join(common.default_out("label_noise", "main"), "table.md")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", probe], cwd=common.REPO_ROOT, check=False
    ).returncode
    assert ignored == 0, f"{probe} is not ignored by git"


@pytest.mark.parametrize("module", ["label_noise", "noisy_training", "sharpness_generalization"])
def test_every_config_key_has_help(module, capsys):
    script = sys.modules[module]
    for name, preset in script.PRESETS.items():
        assert set(preset) <= set(script.HELP), (module, name, set(preset) - set(script.HELP))
        assert preset["out"] is None, (module, name)  # default: the ignored runs/ folder
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text  # plain text, not reST
    for key in script.PRESETS["default"]:
        assert f"--{key}" in text


def test_mean_std_and_table():
    assert common.fmt_mean_std([0.5, 0.7]) == "60.0 ± 14.1"
    assert common.fmt_mean_std([None]) == "—"
    table = common.markdown_table(["a", "b"], [[1, 2]])
    assert table_rows(table) == [["a", "b"], ["1", "2"]]


# --------------------------------------------------------------------------------------
# The experiments.
# --------------------------------------------------------------------------------------


def test_label_noise_tiny(tmp_path):
    out = str(tmp_path / "label_noise")
    result = label_noise.main(["--preset", "tiny", "--out", out])
    config = result["config"]
    expected_runs = len(config["noise"]) * len(config["seeds"]) * len(config["optimizers"])
    expected_runs += len(config["extra_noise"]) * len(config["seeds"])  # GSAM row
    assert len(result["runs"]) == expected_runs

    assert common.read_json(os.path.join(out, "config.json"))["preset"] == "tiny"
    run_files = sorted(os.listdir(os.path.join(out, "runs")))
    assert len(run_files) == expected_runs
    for name in run_files:
        run = common.read_json(os.path.join(out, "runs", name))
        assert all_finite(run)
        assert 0.0 <= run["final_test_accuracy"] <= 1.0
        assert 0.0 <= run["best_test_accuracy"] <= 1.0
        assert run["best_test_accuracy"] >= run["final_test_accuracy"]
        assert len(run["history"]) == config["epochs"]
        noisy = run["noise"] != "symmetric:0.0"
        assert (run["final_memorization"] is not None) == noisy
        if run["optimizer"] == "saner":
            assert 0.0 < run["mean_masked_fraction"] < 1.0
    summary = common.read_json(os.path.join(out, "summary.json"))
    assert len(summary["runs"]) == expected_runs and "run_config" not in summary["runs"][0]
    assert all(len(r["history"]) == config["epochs"] for r in summary["runs"])

    table = read_text(os.path.join(out, "table.md"))
    final = table_rows(table, "## Final test accuracy")
    assert final[0] == ["optimizer", "clean", "sym 40%"]
    assert [row[0] for row in final[1:]] == ["SGD", "SAM", "SANER", "GSAM"]
    assert all("±" in cell for row in final[1:3] for cell in row[1:])
    assert final[4][1] == "—" and "±" in final[4][2]  # GSAM: 40 % only
    memorization = table_rows(table, "## Memorisation")
    assert memorization[1][1] == "—" and "±" in memorization[1][2]
    masked = table_rows(table, "## SANER's masked fraction")
    assert [row[0] for row in masked[1:]] == ["SANER"]
    check_pngs(result["plots"], out)
    assert {os.path.basename(p) for p in result["plots"]} == {
        "test_accuracy.png",
        "memorization.png",
        "masked_fraction.png",
        "accuracy_vs_noise.png",
        "sharpness.png",
    }

    # --report redraws from summary.json alone: the same table, the same plots, no training
    # (the stored runs are removed first, so nothing could be reused from them).
    for name in run_files:
        os.remove(os.path.join(out, "runs", name))
    os.remove(os.path.join(out, "table.md"))
    for path in result["plots"]:
        os.remove(path)
    again = label_noise.main(["--out", out, "--report"])
    assert read_text(os.path.join(out, "table.md")) == table
    assert again["config"]["preset"] == "tiny"  # the stored config, not the default preset
    assert sorted(again["plots"]) == sorted(result["plots"])
    check_pngs(again["plots"], out)
    assert os.listdir(os.path.join(out, "runs")) == []


def test_report_without_summary_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        label_noise.main(["--out", str(tmp_path), "--report"])


def test_label_noise_presets_are_valid_configs():
    """Every preset builds valid TrainConfigs (CIFAR ones included, without touching data)."""
    for name, preset in label_noise.PRESETS.items():
        config = {**preset, "preset": name}
        grid = label_noise.run_grid(config)
        assert grid, name
        for opt, setting, seed in grid[:: max(1, len(grid) // 10)]:
            label_noise.train_config(config, opt, setting, seed)
    cifar = label_noise.PRESETS["cifar10"]
    assert (cifar["model"], cifar["epochs"], cifar["batch_size"]) == ("resnet18", 200, 128)
    assert (cifar["learning_rate"], cifar["momentum"], cifar["weight_decay"]) == (0.1, 0.9, 5e-4)
    assert (cifar["rho"], cifar["saner_alpha"], cifar["saner_warmup_epochs"]) == (0.1, 0.5, 50)
    main = label_noise.PRESETS["main"]
    assert main["optimizers"] == ["sgd", "sam", "vasso", "saner"]
    assert main["noise"] == ["symmetric:0.4"] and len(main["seeds"]) >= 2

    # A SAM-ON run is the trainer's SAM with sam_on() groups: the second gradient is taken at
    # w + ε with ε = ρ g_S / ‖g_S‖ on the BatchNorm parameters S and 0 elsewhere.
    import jax
    import jax.numpy as jnp

    from sharpjax.models import get_model
    from sharpjax.train import loop

    config = {**label_noise.PRESETS["recent_bn"], "preset": "recent_bn"}
    tc = label_noise.train_config(config, "sam_on", "symmetric:0.4", 0)
    assert (tc.optimizer, tc.rho, tc.model_kwargs) == ("sam", 1.0, {"batch_norm": True})
    original = loop.make_optimizer
    with label_noise.grouped_optimizer("sam_on"):
        tx = loop.make_optimizer(tc, 10)
    assert loop.make_optimizer is original
    model = get_model("cnn1d", 10, features=(2,), hidden_sizes=(), batch_norm=True)
    params = model.init(jax.random.key(0), jnp.ones((4, 40)))["params"]
    grads = jax.tree.map(lambda p: jnp.arange(1.0, p.size + 1).reshape(p.shape), params)
    seen = []
    tx.update(grads, tx.init(params), params, grad_fn=lambda w: seen.append(w) or grads)
    eps = jax.tree.map(lambda a, b: a - b, seen[0], params)
    norm_s = math.sqrt(sum(float(jnp.sum(g**2)) for g in grads["BatchNorm_0"].values()))
    for name, leaf in grads["BatchNorm_0"].items():
        assert jnp.allclose(eps["BatchNorm_0"][name], leaf / norm_s, rtol=1e-5, atol=1e-6)
    assert all(not jnp.any(eps[layer]["kernel"]) for layer in ("Conv_0", "Dense_0"))


def test_noisy_training_tiny(tmp_path):
    out = str(tmp_path / "noisy")
    result = noisy_training.main(["--preset", "tiny", "--out", out])
    config = result["config"]
    settings = noisy_training.settings(config)
    methods = noisy_training.methods(config)
    assert len(result["runs"]) == len(settings) * len(methods) * len(config["seeds"])
    for run in result["runs"]:
        assert all_finite(run) and 0.0 <= run["final_test_accuracy"] <= 1.0
        stored = common.read_json(os.path.join(out, "runs", f"{run['id']}.json"))
        assert stored["final_test_accuracy"] == run["final_test_accuracy"]
        # the disturbance really reached the TrainConfig of the run
        for field in noisy_training.DISTURBANCES:
            expected = run["scale"] if field == run["disturbance"] else 0.0
            assert stored["run_config"][field] == pytest.approx(expected)

    table = read_text(os.path.join(out, "table.md"))
    rows = table_rows(table)
    assert rows[0] == ["method", "none", "grad σ=0.05", "param σ=0.003", "bias=0.001"]
    assert [r[0] for r in rows[1:]] == ["SGD", "SAM", "noise-resistant SAM (μ=0.01)"]
    assert all("±" in cell for r in rows[1:] for cell in r[1:])
    diffs = table_rows(table, "## Final test accuracy: difference to SAM")
    assert [r[0] for r in diffs[1:]] == ["SGD − SAM", "noise-resistant SAM (μ=0.01) − SAM"]
    last = table_rows(table, "## Mean test accuracy over the last")
    assert last[0] == rows[0] and all("±" in cell for r in last[1:] for cell in r[1:])
    drift = table_rows(table, "## Mean parameter value")
    assert drift[0] == ["method", "none", "bias=0.001"]
    check_pngs(result["plots"], out)


def test_sharpness_generalization_tiny(tmp_path):
    out = str(tmp_path / "sharp")
    result = sharpness_generalization.main(["--preset", "tiny", "--out", out])
    config = result["config"]
    n = (
        len(config["label_fractions"])
        * len(config["widths"])
        * len(config["learning_rates"])
        * len(config["seeds"])
    )
    assert len(result["runs"]) == n
    for run in result["runs"]:
        assert all_finite(run)
        gap = run["train_accuracy"] - run["test_accuracy"]
        assert run["gap_accuracy"] == pytest.approx(gap, abs=1e-6)
        original = run["measures"]["original"]
        for measure in sharpness_generalization.MEASURES:
            assert math.isfinite(original[measure])
        # Minimum Sharpness never exceeds the trace; node-wise never exceeds layer-wise.
        assert original["min_sharpness_node"] <= original["min_sharpness_layer"] * (1 + 1e-5)
        assert original["min_sharpness_layer"] <= original["trace"] * (1 + 1e-5)
        # The rescalings preserve the function, and Minimum Sharpness (node) with it.
        assert run["relative_logit_change"]["layer"] < 1e-4
        assert run["relative_logit_change"]["node"] < 1e-4
        for kind in ("layer_rescaled", "node_rescaled"):
            after = run["measures"][kind]["min_sharpness_node"]
            assert after == pytest.approx(original["min_sharpness_node"], rel=1e-3)
        after = run["measures"]["layer_rescaled"]["min_sharpness_layer"]
        assert after == pytest.approx(original["min_sharpness_layer"], rel=1e-3)
    # ... while the plain trace moves.
    inv = result["invariance"]
    assert inv["trace"]["node_rescaled"]["max_relative_change"] > 0.1
    assert inv["min_sharpness_node"]["node_rescaled"]["max_relative_change"] < 1e-3
    for measure in sharpness_generalization.MEASURES:
        tau = result["correlations"][measure]["gap_accuracy"]["tau"]
        assert -1.0 <= tau <= 1.0

    summary = common.read_json(os.path.join(out, "summary.json"))
    assert set(summary["correlations"]) == set(sharpness_generalization.MEASURES)
    table = read_text(os.path.join(out, "table.md"))
    corr = table_rows(table, "## Kendall")
    assert corr[0][0] == "measure" and len(corr) == 1 + len(sharpness_generalization.MEASURES)
    assert [r[0] for r in corr[1:]] == list(sharpness_generalization.MEASURES.values())
    inv_rows = table_rows(table, "## Scale invariance")
    assert inv_rows[0][:3] == ["measure", "median before", "layer-wise: after/before"]
    assert len(inv_rows) == 1 + len(sharpness_generalization.MEASURES)
    assert "Cross-check of the exact trace" in table
    check_pngs(result["plots"], out)


def test_benchmarks_quick_run_json_and_tables(tmp_path):
    """The harness at --quick on a tiny CNN (no timing assertions): the JSON format, the
    per-round ratios recomputed from the stored window times, and the README table writer."""
    import numpy as np

    out = str(tmp_path / "bench")
    args = ["--quick", "--only", "steps", "--set", 'optimizers=["sgd"]', "--out", out]
    result = bench_run.main([*args, "--tag", "t"])
    path = os.path.join(out, "steps_t.json")
    record = harness.read(path)
    assert record == common.read_json(path)  # stored in the new format, read back unchanged
    assert record["format"] == harness.FORMAT and record["benchmark"] == "steps"
    assert record["config"]["rounds"] == 2 and record["config"]["models"] == ["tiny"]
    machine = record["machine"]
    assert machine["nproc"] == os.cpu_count() and len(machine["load_start"]) == 3
    assert {"cpu", "jax", "device", "load_end", "load_rounds"} <= set(machine)
    rows = {r["name"]: r for r in record["rows"]}
    assert set(rows) == {"sgd", "sam"} and set(result["records"]) == {"steps"}
    for row in rows.values():
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        per_round = np.asarray(row["times_s"]) / np.asarray(rows["sgd"]["times_s"])
        assert row["ratio"]["median"] == pytest.approx(np.median(per_round), rel=1e-5)
        assert row["ratio"]["low"] <= row["ratio"]["median"] <= row["ratio"]["high"]
    assert rows["sam"]["ratio_sam"]["median"] == 1.0
    assert all_finite(record)

    tables = bench_run.tables(out)
    assert list(tables) == ["steps_t"]
    cells = table_rows(tables["steps_t"])
    assert cells[0] == ["optimizer", "/ SGD", "/ SAM"]
    assert cells[1][0] == "sharpjax.sam" and cells[1][2] == "1.00 (1.00–1.00)"
    assert "python" in tables["steps_t"] and "load" in tables["steps_t"]

    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- table:steps_t -->\nold\n<!-- /table -->\n<!-- table:x -->\nkeep\n"
                      "<!-- /table -->\n")  # fmt: skip
    assert bench_run.write_readme(out, str(readme)) == ["steps_t"]
    text = readme.read_text()
    assert "old" not in text and "keep" in text and "| sharpjax.sam |" in text
    with pytest.raises(SystemExit, match="unknown benchmark"):
        bench_run.main(["--only", "nope"])
    with pytest.raises(SystemExit, match="not a config key of steps"):
        bench_run.main(["--only", "steps", "--set", "nokey=1", "--out", out])


def test_readme_benchmark_tables_are_the_stored_json():
    """Every README table between benchmark markers is what --tables makes of its JSON."""
    readme = read_text(os.path.join(common.REPO_ROOT, "README.md"))
    tables = bench_run.tables(harness.RESULTS)
    text, done = harness.replace_tables(readme, tables)
    assert done, "no <!-- table:NAME --> markers in README.md"
    assert text == readme, (
        "README tables differ: run python -m experiments.benchmarks --tables --write-readme"
    )


def test_benchmarks_legacy_steps_json_converted():
    """A former bench_steps.py JSON keeps its numbers as a record (ratios of medians)."""
    old = {
        "device": "cpu:0", "platform": "p", "cpu_count": 2, "batch_size": 256, "repeats": 10,
        "window": 10, "load_average": [4.2, 4.3, 3.7], "planned_on_host": ["looksam"],
        "median_seconds": {"sgd": 0.1, "sam": 0.2, "looksam": 0.12, "msam": 1.0},
        "compile_seconds": {"sgd": 1.0, "sam": 2.0, "looksam": 3.0, "msam": 4.0},
        "temp_bytes": {"sgd": 1, "sam": 2, "looksam": 3, "msam": 4},
        "second_gradient_fraction": {"looksam": 0.2},
        "ratio_to_sgd": {"sgd": 1.0, "sam": 2.0, "looksam": 1.2, "msam": 10.0},
        "ratio_to_sam": {"sgd": 0.5, "sam": 1.0, "looksam": 0.6, "msam": 5.0},
    }  # fmt: skip
    record = legacy.convert("results/benchmarks/steps.json", old)
    harness.check(record)
    rows = {r["name"]: r for r in record["rows"]}
    assert set(rows) == {"sgd", "sam", "looksam", "msam_m8"}
    assert rows["looksam"]["ratio"]["median"] == 1.2 and rows["looksam"]["g2_share"] == 0.2
    assert rows["msam_m8"]["median_s"] == 1.0 and record["machine"]["load_start"][0] == 4.2
    cells = {r[0]: r[1:] for r in table_rows(bench_steps.table(record))}
    assert cells["LookSAM (k = 5), decided on the host"] == ["1.20", "0.60", "20 %"]
