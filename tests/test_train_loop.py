"""The training loop: accuracy, every optimizer, metrics, mixed precision, BatchNorm, noise."""

from __future__ import annotations

import itertools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharpjax
from sharpjax.data import Dataset, iterate_batches, load_dataset
from sharpjax.train import OPTIMIZERS, TrainConfig, init_model, train
from sharpjax.train.metrics import EPOCH_KEYS, memorization

TINY_MLP = {"hidden_sizes": [16]}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small_config(**changes) -> TrainConfig:
    values = dict(
        dataset="digits",
        model="mlp",
        model_kwargs=TINY_MLP,
        epochs=1,
        batch_size=32,
        learning_rate=0.05,
        progress=False,
    )
    values.update(changes)
    return TrainConfig(**values)


def test_sam_on_digits_learns(digits, tmp_path):
    config = small_config(
        optimizer="sam",
        model_kwargs={"hidden_sizes": [64]},
        epochs=4,
        batch_size=64,
        workdir=str(tmp_path / "run"),
    )
    result = train(config, digits)
    assert result.completed
    assert result.final["test_accuracy"] > 0.85  # chance is 0.10
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    # config.json records the device layout the run resolved (1 device in this process).
    resolved = config.replace(num_devices=1, mesh="data=1,fsdp=1,model=1")
    assert saved == json.loads(json.dumps(resolved.to_dict())) and saved["seed"] == 0
    final = json.loads((tmp_path / "run" / "result.json").read_text())
    assert final["final"] == result.final and final["epochs"] == 4


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_runs(digits, name):
    # noise-resistant SAM in its paper's setting: noisy gradients, noisy and biased params
    disturbances = (
        dict(grad_noise_std=0.1, param_noise_std=1e-3, param_bias=1e-4)
        if name == "noise_resistant_sam"
        else {}
    )
    config = small_config(optimizer=name, max_steps_per_epoch=2, **disturbances)
    result = train(config, digits)
    record = result.final
    assert record["step"] == 2
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])
    if name == "lookbehind_sam":  # k ascent gradients, no single g₂ to compare g with
        assert record["grad_norm"] > 0 and record["perturbation_norm"] > 0
    elif name not in ("sgd", "adamw"):
        assert record["grad_norm"] > 0
        # The diagnostics convention (SharpnessAwareState): a cosine the rule never measures
        # is absent; one not measured yet (no step took g₂) is NaN, written as null.
        if record.get("cosine") is None and "second_gradient_fraction" in record:
            assert record["second_gradient_fraction"] == 0
        elif "cosine" in record:
            assert np.isfinite(record["cosine"])


def test_metrics_file_and_saner_diagnostics(digits, tmp_path):
    workdir = tmp_path / "saner"
    config = small_config(
        optimizer="saner", epochs=2, eval_every=2, max_steps_per_epoch=3, workdir=str(workdir)
    )
    result = train(config, digits)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert records == result.history
    for record in records:
        assert set(EPOCH_KEYS) <= set(record)
        assert 0.0 <= record["masked_fraction"] <= 1.0 and record["alpha"] == 0.5
        assert record["memorization"] is None  # no label noise
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["step"] == 6
    assert records[0]["test_accuracy"] is None  # eval_every=2
    assert records[1]["test_accuracy"] is not None
    labels = np.load(workdir / "labels.npz")
    np.testing.assert_array_equal(labels["y_train"], digits.y_train)


def test_memorization_by_hand():
    predictions = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    noisy = np.array([0, 1, 9, 3, 9, 5, 6, 1])
    clean = np.array([0, 2, 9, 4, 4, 5, 7, 7])
    # corrupted: indices 1, 3, 4, 6, 7; predicted as their noisy label: 1, 3, 6 -> 3 of 5
    assert memorization(predictions, noisy, clean) == pytest.approx(3 / 5)
    assert memorization(predictions, clean, clean) is None


def test_memorization_in_the_loop_on_a_crafted_dataset(digits):
    """A tiny noisy dataset: the loop's memorisation equals a count from the final model."""
    rng = np.random.default_rng(0)
    x, y_clean = digits.x_train[:64], digits.y_train[:64]
    y = y_clean.copy()
    flipped = rng.choice(64, size=16, replace=False)
    y[flipped] = (y[flipped] + 1 + rng.integers(0, 9, size=16)) % 10
    data = Dataset("digits", x, y, y_clean, digits.x_test[:50], digits.y_test[:50], 10)
    config = small_config(
        optimizer="sgd",
        noise="symmetric",
        noise_rate=0.25,
        epochs=3,
        batch_size=16,
        learning_rate=0.2,
        model_kwargs={"hidden_sizes": [64]},
    )
    result = train(config, data)

    # The loop predicts with its own jitted program (padded eval batches); the logits here
    # come from another program, so they may differ by float32 rounding: ~130 products
    # accumulated per logit over two layers, ≲ 1e-4 × the logits' scale. An example whose
    # top-2 margin is below that may have its argmax flipped by rounding: count it on both
    # sides of the bracket (a wrong count, e.g. of clean instead of noisy labels, moves
    # whole examples, 1/16 or 1/64, and still fails).
    def confident_and_predicted(inputs):
        logits = np.asarray(result.model.apply({"params": result.params}, inputs))
        top2 = np.sort(logits, -1)[:, -2:]
        tol = 1e-4 * (1.0 + np.abs(logits).max())
        return top2[:, 1] - top2[:, 0] > tol, logits.argmax(-1)

    def bracket(hit, sure):
        """(fewest, most) hits when each unsure example may go either way."""
        return int(np.sum(hit & sure)), int(np.sum(hit | ~sure))

    sure, predictions = confident_and_predicted(x)
    corrupted = y != y_clean
    assert corrupted.sum() == 16
    low, high = bracket(predictions[corrupted] == y[corrupted], sure[corrupted])
    assert low / 16 - 1e-9 <= result.final["memorization"] <= high / 16 + 1e-9
    low, high = bracket(predictions == y_clean, sure)
    assert low / 64 - 1e-9 <= result.final["train_accuracy_clean"] <= high / 64 + 1e-9
    assert sure.mean() > 0.9  # the brackets are (nearly) exact counts, not vacuous

    sure, test_pred = confident_and_predicted(data.x_test)
    low, high = bracket(test_pred == data.y_test, sure)
    assert low / 50 - 1e-9 <= result.final["test_accuracy"] <= high / 50 + 1e-9


def test_mixed_precision(digits):
    result = train(small_config(optimizer="sam", mixed_precision=True, epochs=2), digits)
    assert result.model.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(result.params))
    floats = [x for x in jax.tree.leaves(result.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(x.dtype == jnp.float32 for x in floats)
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert result.final["test_accuracy"] > 0.5


class BNNet(nn.Module):
    """Dense → BatchNorm → ReLU → Dense → BatchNorm: two layers of statistics."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(16)(x)))
        x = nn.Dense(self.num_classes)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


def test_batch_stats_come_from_the_clean_pass(digits):
    """After one SAM step, batch_stats are the clean pass's update, computed here by hand."""
    model = BNNet()
    config = small_config(optimizer="sam", rho=1.0, max_steps_per_epoch=1)
    result = train(config, digits, model=model)

    params, stats = init_model(model, digits.x_train, config.seed)
    xb, yb = next(iterate_batches(digits.x_train, digits.y_train, batch_size=32, seed=0, epoch=0))

    def forward(p):
        logits, mutated = model.apply(
            {"params": p, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
        )
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))
        return loss, mutated["batch_stats"]

    (_, clean), g = jax.value_and_grad(forward, has_aux=True)(params)
    # Trainer's jitted step vs the eager ops here: float32 rounding only. Each statistic is a
    # mean over 32 rows of ≤ 64-term dot products: ≲ 1e-5 of the leaf's scale (an absolute
    # bound, since a mean near 0 has no relative accuracy); the perturbed pass's statistics
    # differ by > 1e-3 (checked below).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max())
        ),
        result.batch_stats,
        clean,
    )

    # The perturbed pass would have given other statistics, so the test tells them apart.
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, v: w + config.rho * v / norm, params, g)
    perturbed_stats = forward(perturbed)[1]
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(perturbed_stats), jax.tree.leaves(clean), strict=True)
    )
    assert diff > 1e-3


def test_param_bias(digits):
    """param_bias adds exactly the constant to every param after the step."""
    base = train(small_config(optimizer="sgd", max_steps_per_epoch=1), digits)
    biased = train(small_config(optimizer="sgd", max_steps_per_epoch=1, param_bias=0.01), digits)
    for a, b in zip(jax.tree.leaves(biased.params), jax.tree.leaves(base.params), strict=True):
        np.testing.assert_allclose(a - b, 0.01, rtol=1e-4)


def test_workdir_is_created_with_absolute_paths(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = small_config(max_steps_per_epoch=1, checkpoint_every=1, workdir="rel/run")
    train(config, digits)
    assert os.path.isdir(tmp_path / "rel" / "run" / "checkpoints" / "1")


def test_seed_and_noise_sweep_compiles_the_step_once(digits):
    """Seed and disturbance scales are traced: one compiled program serves the whole sweep."""
    from sharpjax.train import loop

    sweep = [
        small_config(optimizer="sam", max_steps_per_epoch=2, seed=seed, grad_noise_std=g, **p)
        for seed, g, p in [
            (0, 0.01, {}),
            (1, 0.01, {}),
            (0, 0.05, {"param_noise_std": 1e-3}),
            (0, 0.05, {"param_bias": 1e-3}),
        ]
    ]
    results = [train(config, digits) for config in sweep]
    model = results[0].model
    _, step, _ = loop.compiled_functions(model, sweep[0], 2, loop.train_mesh(sweep[0]))
    assert step._cache_size() == 1
    # ... and every run was different: the seed, the noise scales and the bias reached it.
    flats = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(r.params)]) for r in results]
    for i in range(len(flats)):
        for j in range(i):
            assert np.max(np.abs(flats[i] - flats[j])) > 1e-4, (i, j)


def test_device_fields_are_checked_before_compiling(digits):
    with pytest.raises(ValueError, match="batch_size=60 is not a multiple of num_devices=8"):
        small_config(batch_size=60, num_devices=8)
    with pytest.raises(ValueError, match="group_size=3 does not divide num_devices=8"):
        small_config(perturbation_mode="grouped", group_size=3, num_devices=8)
    with pytest.raises(ValueError, match="only used with perturbation_mode='grouped'"):
        small_config(group_size=2)
    with pytest.raises(ValueError, match="perturbation_mode='grouped' needs group_size"):
        small_config(perturbation_mode="grouped")
    with pytest.raises(ValueError, match="perturbation_mode='x' is not one of"):
        small_config(perturbation_mode="x")
    # This process has one device: asking for 2 fails at once, naming the argument.
    with pytest.raises(ValueError, match=r"num_devices=2 must be an int in \[1, 1\]"):
        train(small_config(num_devices=2), digits)
    with pytest.raises(ValueError, match="num_micro_steps=3 must be >= 1 and divide"):
        small_config(num_micro_steps=3)


def test_gradient_accumulation_in_the_trainer_equals_the_whole_batch(digits):
    # No BatchNorm, no dropout: k micro-steps give the full-batch gradient (float32 sums).
    base = small_config(optimizer="sam", max_steps_per_epoch=3)
    whole = train(base, digits)
    accumulated = train(base.replace(num_micro_steps=4), digits)
    pairs = zip(jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_each_process_gathers_only_its_rows_and_prefetch_keeps_the_order():
    from sharpjax import parallel
    from sharpjax.data import prefetch_to_mesh

    x, y = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20)
    whole = list(iterate_batches(x, y, batch_size=8, seed=3, epoch=1))
    parts = [
        list(iterate_batches(x, y, batch_size=8, seed=3, epoch=1, num_shards=4, shard_index=i))
        for i in range(4)
    ]
    assert len(whole) == 2 and all(len(p) == 2 for p in parts)
    for k, (xb, yb) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([p[k][0] for p in parts]), xb)
        np.testing.assert_array_equal(np.concatenate([p[k][1] for p in parts]), yb)
        assert all(len(p[k][1]) == 2 for p in parts)
    with pytest.raises(ValueError, match="batch_size=8 is not a multiple of num_shards=3"):
        next(iterate_batches(x, y, batch_size=8, seed=0, epoch=0, num_shards=3))
    mesh = parallel.make_mesh(None)
    fetched = list(prefetch_to_mesh(iter(whole), mesh, size=2))
    assert len(fetched) == len(whole)
    for (xb, yb), (xd, yd) in zip(whole, fetched, strict=True):
        assert xd.sharding.spec == jax.sharding.PartitionSpec("batch")
        np.testing.assert_array_equal(np.asarray(xd), xb)
        np.testing.assert_array_equal(np.asarray(yd), yb)


def test_looksam_in_the_trainer_takes_the_second_gradient_every_k_steps(digits):
    # On CPU the trainer runs LookSAM as two programs chosen on the host (the decision read
    # ahead); the step count 0, 5, ... takes the second gradient, so 2 of 10 steps.
    result = train(small_config(optimizer="looksam", epochs=2, max_steps_per_epoch=5), digits)
    diag = sharpjax.diagnostics(result.opt_state)
    assert float(diag["second_gradient_fraction"]) == pytest.approx(0.2)
    assert np.isfinite(result.final["train_loss"])


def test_ae_sam_in_the_trainer_splits_the_step_and_equals_the_cond_step(digits):
    # On CPU the trainer runs AE-SAM as two halves (clean gradient and decision, then the
    # update with or without g₂): each step equals the one-program step with the lax.cond.
    from sharpjax import parallel
    from sharpjax.train import loop

    config = small_config(optimizer="ae_sam", max_steps_per_epoch=6)
    result = train(config, digits)
    fraction = float(sharpjax.diagnostics(result.opt_state)["second_gradient_fraction"])
    assert 0 < fraction < 1

    mesh = parallel.make_mesh(None)
    model = result.model
    tx, split_step, _ = loop.compiled_functions(model, config, 6, mesh)
    cond_step = loop._make_train_step(model, tx, config, mesh, None)
    assert not hasattr(split_step, "lower")  # host-side: not one jitted program
    params, batch_stats = loop.init_model(model, digits.x_train, config.seed)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "batch_stats": batch_stats,
        "step": jnp.zeros([], jnp.int32),
    }
    hyper = loop.step_inputs(config, mesh)
    batches = iterate_batches(digits.x_train, digits.y_train, batch_size=32, seed=0, epoch=0)
    took, compared = [], 0
    for batch in itertools.islice(batches, 6):
        batch = parallel.replicate_on(mesh, batch)
        sums = loop._zero_sums(state["opt_state"], mesh)
        got, got_sums = split_step(parallel.replicate_on(mesh, state), sums, batch, hyper)
        sums = loop._zero_sums(state["opt_state"], mesh)
        want, want_sums = cond_step(parallel.replicate_on(mesh, state), sums, batch, hyper)
        took.append(float(want_sums["second_gradient"]))
        # The decision is x ≥ μ + c σ, i.e. z ≥ c; away from a near-tie both programs agree.
        margin = abs(float(want_sums["grad_sq_zscore"]) - float(want_sums["threshold"]))
        if len(took) == 1 or margin > 1e-3:
            compared += 1
            assert float(got_sums["second_gradient"]) == took[-1]
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        state = jax.device_get(got)
    assert 0 < sum(took) < len(took) and compared >= 5
