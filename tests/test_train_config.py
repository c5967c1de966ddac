"""TrainConfig validation, command-line overrides and make_optimizer."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import sharpjax
from sharpjax.train import (
    OPTIMIZERS,
    TrainConfig,
    config_from_args,
    learning_rate_schedule,
    make_optimizer,
)
from sharpjax.train.config import build_parser, field_help
from tests.helpers import cross_entropy, tiny_mlp_params, toy_batches


def test_config_from_args_converts_types():
    config = config_from_args(
        [
            "--optimizer=saner",
            "--rho",
            "0.2",
            "--epochs=7",
            "--model_kwargs",
            '{"hidden_sizes": [32, 16]}',
            "--progress=false",
            "--mixed-precision",  # bare flag, dash spelling
            "--max_steps_per_epoch=none",
            "--alpha=0.25",
            "--workdir=/tmp/x",
        ]
    )
    assert config.optimizer == "saner"
    assert config.rho == 0.2 and isinstance(config.rho, float)
    assert config.epochs == 7 and isinstance(config.epochs, int)
    assert config.model_kwargs == {"hidden_sizes": [32, 16]}
    assert config.progress is False and config.mixed_precision is True
    assert config.max_steps_per_epoch is None
    assert config.alpha == 0.25 and config.workdir == "/tmp/x"
    # overrides apply on top of a base config
    base = TrainConfig(dataset="digits", model="mlp")
    assert config_from_args(["--seed=3"], base).dataset == "digits"
    assert config_from_args(["--seed=3"], base).seed == 3


def test_config_from_args_errors():
    with pytest.raises(ValueError, match=r"Unknown TrainConfig field.*learning_rate"):
        config_from_args(["--lr=0.1"])
    with pytest.raises(ValueError, match="cannot parse 'abc' as int"):
        config_from_args(["--epochs=abc"])
    with pytest.raises(ValueError, match="JSON object"):
        config_from_args(["--model_kwargs=[1]"])
    with pytest.raises(ValueError, match="needs a value"):
        config_from_args(["--epochs"])
    with pytest.raises(ValueError, match="--key=value"):
        config_from_args(["epochs=3"])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dataset": "imagenet"}, r"dataset='imagenet' is not one of 'digits', 'mnist1d'"),
        ({"model": "vit"}, r"model='vit' is not one of 'mlp'"),
        ({"optimizer": "lion"}, r"optimizer='lion' is not one of 'sgd', 'adamw', 'sam'"),
        ({"lr_schedule": "poly"}, "lr_schedule"),
        ({"noise": "symmetric", "noise_rate": 1.0}, r"noise_rate must lie in \[0, 1\)"),
        ({"noise": "symmetric", "noise_rate": -0.1}, "noise_rate"),
        ({"noise_rate": 0.2}, "needs noise='symmetric'"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"epochs": 0}, "epochs must be positive"),
        ({"batch_size": -1}, "batch_size must be positive"),
        ({"optimizer": "msam", "batch_size": 10, "num_microbatches": 3}, "num_microbatches"),
        ({"optimizer": "saner", "alpha": 1.5}, "alpha"),
        ({"theta": 0.0}, "theta"),
        ({"grad_noise_std": -1.0}, "grad_noise_std"),
        ({"optimizer": "sgd", "base_optimizer": "adamw"}, "contradictory"),
    ],
)
def test_validation_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_validation_types():
    with pytest.raises(TypeError, match="epochs must be int"):
        TrainConfig(epochs=2.5)
    with pytest.raises(ValueError, match="Unknown TrainConfig field"):
        TrainConfig.from_dict({"epochs": 2, "colour": "red"})
    config = TrainConfig(dataset="digits", model="mlp", learning_rate=1)  # int is a fine float
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_batch_size_larger_than_dataset():
    from sharpjax.train import train

    config = TrainConfig(dataset="digits", model="mlp", batch_size=5000, progress=False)
    with pytest.raises(ValueError, match=r"batch_size=5000 exceeds the 1347 training examples"):
        train(config)


def test_learning_rate_schedules():
    def values(**kw):
        config = TrainConfig(dataset="digits", model="mlp", epochs=4, learning_rate=0.1, **kw)
        schedule = learning_rate_schedule(config, steps_per_epoch=10)
        return np.array([float(schedule(t)) for t in range(40)])

    np.testing.assert_allclose(values(lr_schedule="constant"), 0.1)
    cosine = values(lr_schedule="cosine")
    assert cosine[0] == pytest.approx(0.1) and cosine[-1] < 1e-3 and np.all(np.diff(cosine) <= 0)
    step = values(lr_schedule="step")
    # float32 products of 0.1 factors: ≤ 3 roundings of the float64 decimal
    want = [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3]
    np.testing.assert_allclose(step[[0, 19, 20, 29, 30, 39]], want, rtol=1e-6)
    warm = values(lr_schedule="constant", warmup_epochs=1)
    np.testing.assert_allclose(warm[[0, 5, 10, 39]], [0.0, 0.05, 0.1, 0.1], atol=1e-7)


def test_make_optimizer_weight_decay_outside_the_perturbation():
    """One SAM step by hand: ε = ρ g/‖g‖ from the loss gradient only, then sgd on g₂ + wd·w."""
    lr, rho, wd = 0.1, 0.3, 0.01
    config = TrainConfig(
        dataset="digits",
        model="mlp",
        optimizer="sam",
        rho=rho,
        learning_rate=lr,
        weight_decay=wd,
        momentum=0.9,
        lr_schedule="constant",
    )
    tx = make_optimizer(config, steps_per_epoch=5)
    params = tiny_mlp_params(jax.random.key(0))
    (x, y) = toy_batches(jax.random.key(1), 1)[0]
    grad = jax.jit(jax.grad(cross_entropy))
    g = grad(params, x, y)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q: grad(q, x, y)))
    updates, _ = update(g, tx.init(params), params)

    g_norm = np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, v: w + rho * v / g_norm, params, g)
    g2 = grad(perturbed, x, y)
    expected = jax.tree.map(lambda v, w: -lr * (np.asarray(v) + wd * np.asarray(w)), g2, params)
    # Another program for g, ‖g‖ and g2: a gradient sums ≲ 30 terms, so ≲ 30 eps ≈ 4e-6 of
    # its scale (≲ 1), times lr: ≲ 4e-7. Weight decay inside ε (the bug) moves it by ~1e-4.
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_make_optimizer_every_name(name):
    config = TrainConfig(dataset="digits", model="mlp", optimizer=name, batch_size=16)
    tx = make_optimizer(config, steps_per_epoch=3)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = tiny_mlp_params(jax.random.key(0))
    state = tx.init(params)
    if name in ("sgd", "adamw"):
        assert sharpjax.diagnostics(state) == {}
    elif name == "momentum_sam":  # one gradient: no g₂ to compare with
        assert {"velocity_norm", "rho"} <= set(sharpjax.diagnostics(state))
    elif name == "lookbehind_sam":  # k ascent gradients, no single g₂ to compare g with
        assert {"grad_norm", "perturbation_norm", "rho"} <= set(sharpjax.diagnostics(state))
    else:
        assert "cosine" in sharpjax.diagnostics(state)


def test_momentum_sam_in_the_trainer_is_the_papers_equations():
    """Becker et al. 2023 on the true weights w: g_t = ∇L(w̃_t) + wd·w̃_t at w̃_t = w_t − ρ v̂_t
    (v̂ = 0 while v = 0), v_{t+1} = μ v_t + g_t, w_{t+1} = w_t − η v_{t+1}; the trainer holds w̃."""
    from jax.flatten_util import ravel_pytree

    lr, mu, rho, wd = 0.1, 0.9, 0.2, 0.01
    config = TrainConfig(
        dataset="digits", model="mlp", optimizer="momentum_sam", rho=rho, learning_rate=lr,
        momentum=mu, weight_decay=wd, lr_schedule="constant",
    )  # fmt: skip
    tx = make_optimizer(config, steps_per_epoch=5)
    params = tiny_mlp_params(jax.random.key(0))
    batches = toy_batches(jax.random.key(1), 3)
    grad = jax.jit(jax.grad(cross_entropy))
    flat, unravel = ravel_pytree(params)
    w, v = np.asarray(flat, np.float64), np.zeros(flat.size)

    def perturbed(w, v):
        norm = np.linalg.norm(v)
        return w - (rho * v / norm if norm > 0 else 0.0)

    held, state = params, tx.init(params)
    for x, y in batches:
        g = grad(held, x, y)
        updates, state = tx.update(g, state, held, grad_fn=lambda q, x=x, y=y: grad(q, x, y))
        held = optax.apply_updates(held, updates)
        w_tilde = perturbed(w, v)
        g_ref = np.asarray(ravel_pytree(grad(unravel(w_tilde.astype(np.float32)), x, y))[0])
        v = mu * v + g_ref + wd * w_tilde
        w = w - lr * v
    # float32 params (≲ 1) through 3 steps of a few ops each: ≲ 1e-6; the gradients at
    # float32-rounded w̃ differ by ≲ 30 eps of their scale. A wrong sign or step is ≳ 1e-2.
    np.testing.assert_allclose(ravel_pytree(held)[0], perturbed(w, v), rtol=1e-5, atol=2e-6)
    true = sharpjax.momentum_sam_weights(held, state)
    np.testing.assert_allclose(ravel_pytree(true)[0], w, rtol=1e-5, atol=2e-6)


def test_the_trainer_with_momentum_sam_at_rho_0_is_sgd_with_momentum():
    # ρ = 0 perturbs nothing: Momentum-SAM is then SGD with momentum (and the same decay).
    from sharpjax.train import train

    common = dict(dataset="digits", model="mlp", model_kwargs={"hidden_sizes": [16]}, epochs=2,
                  batch_size=32, max_steps_per_epoch=3, progress=False)  # fmt: skip
    msam = train(TrainConfig(**common, optimizer="momentum_sam", rho=0.0))
    sgd = train(TrainConfig(**common, optimizer="sgd"))
    assert {"velocity_norm", "rho"} <= set(msam.final)
    # Two programs for the same 6 steps: float32 rounding (≲ 1e-7 per op) only.
    for a, b in zip(jax.tree.leaves(msam.params), jax.tree.leaves(sgd.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer=sgd", "--rho=0.1"], r"rho=0\.1 is ignored by optimizer='sgd': rho is the "),
        (["--optimizer=sam", "--alpha=0.5"], "alpha=0.5 is ignored by optimizer='sam'"),
        (["--optimizer=sam", "--theta=0.5"], "theta=0.5 is ignored by optimizer='sam'"),
        (["--optimizer=vasso", "--eta=0.1"], "eta=0.1 is ignored by optimizer='vasso'"),
        (["--optimizer=sam", "--mu=0.1"], "mu=0.1 is ignored by optimizer='sam'"),
        (["--optimizer=sam", "--num_microbatches=2"], "num_microbatches=2 is ignored"),
        (["--optimizer=sam", "--saner_warmup_epochs=2"], "saner_warmup_epochs=2 is ignored"),
        (["--optimizer=saner", "--measure_cosine=false"], "measure_cosine=False is ignored"),
        # Given explicitly, even at its default value: the user expected it to matter.
        (["--optimizer=sgd", "--perturbation_mode=synced"], "perturbation_mode='synced' is ig"),
        (["--optimizer=adamw", "--momentum=0.5"], "momentum=0.5 is ignored by optimizer='adamw'"),
        (["--optimizer=sam", "--base_optimizer=adamw", "--momentum=0.5"], "momentum=0.5 is ig"),
        (["--optimizer=adamw", "--base_optimizer=adamw"], "base_optimizer='adamw' is ignored"),
        (["--optimizer=momentum_sam", "--theta=0.5"], "theta=0.5 is ignored by optimizer='mom"),
        (["--optimizer=momentum_sam", "--base_optimizer=adamw"], "momentum_sam' replaces SGD"),
    ],
)
def test_an_option_the_optimizer_ignores_is_an_error(argv, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(argv)


def test_ignored_options_from_python():
    # rho and alpha default to None, so a value was set on purpose; so was a device mode.
    with pytest.raises(ValueError, match=r"rho=0\.1 is ignored by optimizer='sgd'"):
        TrainConfig(optimizer="sgd", rho=0.1)
    with pytest.raises(ValueError, match=r"alpha=0\.5 is ignored by optimizer='vasso'"):
        TrainConfig(optimizer="vasso", alpha=0.5)
    with pytest.raises(ValueError, match="perturbation_mode='per_device' is ignored"):
        TrainConfig(optimizer="sgd", perturbation_mode="per_device")
    # Options with a default are shared by a grid over optimizers (experiments pass theta,
    # momentum, ... to every run): from Python they are no error.
    assert TrainConfig(optimizer="sgd", theta=0.5, mu=0.1).theta == 0.5
    # The defaults of the command line's base config are not "given".
    assert config_from_args(["--optimizer=adamw"]).momentum == 0.9


# (optimizer, option) pairs the table says are read, each by a subset of the optimizers:
# changed to a value no default has, the option must change 2 steps of a tiny MLP.
READ_BY_SOME = [("vasso", "theta", 0.5), ("asam", "eta", 0.1), ("noise_resistant_sam", "mu", 0.5),
                ("saner", "alpha", 0.3), ("gsam", "alpha", 0.3), ("momentum_sam", "rho", 0.2),
                ("momentum_sam", "momentum", 0.5)]  # fmt: skip


def test_the_options_the_table_says_are_read_change_the_run():
    import types

    from sharpjax.train.config import OPTIMIZER_OPTIONS

    params = tiny_mlp_params(jax.random.key(0))
    batches = toy_batches(jax.random.key(1), 2)
    grad = jax.jit(jax.grad(cross_entropy))  # compiled once; the updates run eagerly

    def run(config):
        tx, p = make_optimizer(config, steps_per_epoch=3), params
        state = tx.init(p)
        for x, y in batches:
            g = grad(p, x, y)
            updates, state = tx.update(g, state, p, grad_fn=lambda q, x=x, y=y: grad(q, x, y))
            p = optax.apply_updates(p, updates)
        return np.concatenate([np.ravel(a) for a in jax.tree.leaves(p)])

    before = {}
    for name, option, value in READ_BY_SOME:
        base = TrainConfig(dataset="digits", model="mlp", optimizer=name, lr_schedule="constant")
        assert OPTIMIZER_OPTIONS[option][1](types.SimpleNamespace(**base.to_dict()))
        if name not in before:
            before[name] = run(base)
        after = run(TrainConfig(**{**base.to_dict(), option: value}))
        # Each change moves some parameter by ≳ 1e-4 in 2 steps; rounding is ≲ 1e-7.
        assert np.max(np.abs(after - before[name])) > 1e-5, (name, option)


def test_make_optimizer_saner_warmup_and_gsam_rho_schedule():
    params = tiny_mlp_params(jax.random.key(0))
    (x, y) = toy_batches(jax.random.key(1), 1)[0]
    grad_fn = lambda p: jax.grad(cross_entropy)(p, x, y)
    g = jax.jit(grad_fn)(params)

    config = TrainConfig(
        dataset="digits", model="mlp", optimizer="saner", alpha=0.5, saner_warmup_epochs=2
    )
    tx = make_optimizer(config, steps_per_epoch=4)
    update = jax.jit(lambda s: tx.update(g, s, params, grad_fn=grad_fn)[1])
    state = tx.init(params)
    alphas = []
    for _ in range(9):
        state = update(state)
        alphas.append(float(sharpjax.diagnostics(state)["alpha"]))
    np.testing.assert_allclose(alphas, [1.0 - 0.5 * t / 8 for t in range(9)], rtol=1e-6)

    config = TrainConfig(
        dataset="digits", model="mlp", optimizer="gsam", rho=0.2, learning_rate=0.1, epochs=2
    )
    tx = make_optimizer(config, steps_per_epoch=4)
    schedule = learning_rate_schedule(config, 4)
    update = jax.jit(lambda s: tx.update(g, s, params, grad_fn=grad_fn)[1])
    state = tx.init(params)
    for t in range(3):
        state = update(state)
        rho_t = float(sharpjax.diagnostics(state)["rho"])
        assert rho_t == pytest.approx(0.2 * float(schedule(t)) / 0.1, rel=1e-6)


# --------------------------------------------------------------------------------------
# The command line a person reads: python -m sharpjax.train.
# --------------------------------------------------------------------------------------


def _run_cli(argv, capsys):
    from sharpjax.train.__main__ import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_has_every_option_with_description_and_default(capsys):
    import dataclasses
    import json

    code, out, _ = _run_cli(["--help"], capsys)
    assert code == 0
    # Plain text: no reStructuredText roles or literals left.
    assert "``" not in out and ":func:" not in out and ":data:" not in out
    assert "python -m sharpjax.train --dataset=digits" in out  # the offline example
    words = " ".join(out.split())  # how to resume, and the lock, whatever the line breaks
    assert (
        "To resume an interrupted run, run the same command again with the same --workdir" in words
    )
    assert "WORKDIR/.sharpjax.lock" in words and "unless --overwrite" in words
    helps = {
        action.dest: action.help
        for action in build_parser()._actions
        if action.dest != "help"  # argparse's own
    }
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in out
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "none" if default is None else json.dumps(default)
        assert helps[f.name].endswith(f"(default: {shown})"), f.name
        assert "(not described)" not in helps[f.name], f"{f.name}: not in the docstring"


def test_help_descriptions_come_from_the_docstring():
    docs = field_help()
    # Two fields described on one line of the docstring are told apart.
    assert docs["epochs"][1] == "number of epochs."
    assert docs["batch_size"][1].startswith("examples per step")
    assert docs["theta"][1] == "VaSSO's θ (also saner_vasso)."
    assert docs["eta"][1] == "ASAM's η (also saner_asam)."
    # Continuation lines are joined, markup removed, sections kept.
    assert docs["augment"] == (
        "Data",
        "random crop (4-pixel padding) and horizontal flip; 32x32 images only.",
    )
    assert docs["seed"][0] == "Run"


def test_help_example_is_an_offline_config():
    from sharpjax.train.config import CLI_EXAMPLE

    argv = CLI_EXAMPLE.split()[3:]  # after "python -m sharpjax.train"
    config = config_from_args(argv)
    assert config.dataset in ("digits", "mnist1d") and config.data_dir is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr=0.1"], r"Unknown TrainConfig field\(s\) \['lr'\]"),
        (["--optimizer=adam"], "optimizer='adam' is not one of"),
        (["--epochs"], "--epochs needs a value"),
        (["--seed=-1"], "seed must be >= 0"),
        (["--dataset=digits", "--model=cnn1d"], r"cnn1d.*\(8, 8, 1\)"),
        # An option the optimizer ignores, named as the command line spells it.
        (["--optimizer=sgd", "--rho=0.1"], r"--rho=0\.1 is ignored by --optimizer=sgd: rho is"),
        (["--optimizer=saner", "--measure_cosine=false"], "--measure_cosine=false is ignored"),
        (["foo"], "unrecognized arguments: foo"),
        (["--learning_rate=inf"], "learning_rate must be a finite number, got inf"),
        (["--overwrite", "--overwrite=false"], "--overwrite is given more than once"),
        (["--checkpoint_every=5"], "--checkpoint_every=5 is ignored without --workdir=DIR"),
        (["--model=mlp", '--model_kwargs={"width": 2}'], r"model_kwargs has \['width'\], which"),
        (["--optimizer=sam", "--perturbation_mode=grouped"], "'grouped' needs group_size"),
    ],
)
def test_cli_user_errors_print_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    import re

    monkeypatch.delenv("SHARPJAX_TRACEBACK", raising=False)
    code, out, err = _run_cli([*argv, "--progress=false"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("python -m sharpjax.train: error: ") and err.count("\n") == 1
    assert re.search(message, err) and "Traceback" not in err


def test_cli_interrupted_says_how_to_resume(capsys, monkeypatch, tmp_path):
    import sharpjax.train.__main__ as cli

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.delenv("SHARPJAX_TRACEBACK", raising=False)
    monkeypatch.setattr(cli, "train", interrupted)
    code, out, err = _run_cli(["--dataset=digits", "--model=mlp", f"--workdir={tmp_path}"], capsys)
    assert code == 130 and out == "" and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "interrupted. To resume, run the same command" in err
    code, _, err = _run_cli(["--dataset=digits", "--model=mlp"], capsys)
    assert code == 130 and "Nothing was saved (no --workdir)" in err


def test_cli_unprepared_dataset_exits_2_with_build_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SHARPJAX_TRACEBACK", raising=False)
    code, _, err = _run_cli(["--dataset=cifar10", f"--data_dir={tmp_path}"], capsys)
    assert code == 2 and "tfds build cifar10" in err and "Traceback" not in err


def test_cli_traceback_on_request(monkeypatch):
    from sharpjax.train.__main__ import main

    monkeypatch.setenv("SHARPJAX_TRACEBACK", "1")
    with pytest.raises(ValueError, match="optimizer='adam'"):
        main(["--optimizer=adam"])
