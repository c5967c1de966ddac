"""One training loop for every optimizer of :data:`~sharpjax.train.config.OPTIMIZERS`.

The jitted step, as data flows (see DESIGN.md)::

    x, y ─► [augment] ─► value_and_grad(loss)(params)      clean loss, g, new batch_stats
         ─► tx.update(g, opt_state, params, grad_fn=...)   the sharpness-aware chain
         ─► params + updates [+ param noise + param bias]
         ─► batch_stats ← the clean pass's updated statistics

``grad_fn`` evaluates the model at the *current* (pre-step) batch statistics, in train mode,
with the same dropout key as the clean pass, and its own statistics updates are dropped. For
``msam`` the clean pass is ``m`` micro-batch passes (vmapped; with BatchNorm each micro-batch
is normalised with its own statistics and the new running statistics are the mean of the
``m`` updates), ``updates`` are the stacked micro-batch gradients and ``grad_fn(p, j)`` the
gradient on micro-batch ``j``, as :func:`sharpjax.msam` asks.

Randomness: the init key, and every step's keys (augmentation, dropout, gradient noise,
parameter noise) are ``fold_in(key(seed), step)`` derivations; the batch order is a function
of ``(seed, epoch)`` (:func:`sharpjax.data.iterate_batches`). Nothing random is carried from
step to step, so resuming from a checkpoint reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import sharpjax
from sharpjax.data import Dataset, augment_crop_flip, iterate_batches, load_dataset
from sharpjax.models import get_model
from sharpjax.train import metrics as metrics_lib
from sharpjax.train.checkpoint import Checkpointer, prepare_workdir
from sharpjax.train.config import (
    RUNTIME_FIELDS,
    TrainConfig,
    learning_rate_schedule,
    make_optimizer,
)

EVAL_BATCH_SIZE = 1024


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      params: final float32 parameters.
      batch_stats: final BatchNorm statistics (``{}`` for models without BatchNorm).
      opt_state: final optimizer state (read diagnostics with ``sharpjax.diagnostics``).
      history: one dict per finished epoch (keys: ``sharpjax.train.metrics``).
      final: the last epoch's dict (``{}`` if no epoch ran).
      config: the run's config.
      model: the flax module that was trained.
      completed: False when the run stopped early (``stop_after_epochs``).
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    history: list[dict[str, Any]]
    final: dict[str, Any]
    config: TrainConfig
    model: nn.Module
    completed: bool

    @property
    def model_state(self) -> Any:
        """Alias of ``batch_stats``: the model's non-parameter state."""
        return self.batch_stats


# --------------------------------------------------------------------------------------
# Model and keys.
# --------------------------------------------------------------------------------------


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(init_key, step_root)``: the init key and the root of the per-step keys."""
    init_key, step_root = jax.random.split(jax.random.key(seed))
    return init_key, step_root


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """``get_model(config.model, ...)`` with ``model_kwargs`` (lists made tuples) and dtype."""

    def freeze(value):
        if isinstance(value, list | tuple):
            return tuple(freeze(v) for v in value)
        return value

    kwargs = {k: freeze(v) for k, v in config.model_kwargs.items()}
    if config.mixed_precision:
        kwargs["dtype"] = jnp.bfloat16
    return get_model(config.model, num_classes, **kwargs)


def init_model(model: nn.Module, sample: np.ndarray, seed: int) -> tuple[Any, Any]:
    """``(params, batch_stats)`` of ``model`` initialised as :func:`train` does for ``seed``.

    ``batch_stats`` is ``{}`` when the model has no BatchNorm.
    """
    init_key, _ = run_keys(seed)
    params_key, dropout_key = jax.random.split(init_key)
    variables = model.init(
        {"params": params_key, "dropout": dropout_key}, jnp.asarray(sample[:1]), train=False
    )
    return variables["params"], variables.get("batch_stats", {})


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _add_normal(tree: Any, key: jax.Array, std: float) -> Any:
    """``tree + std · N(0, 1)``, independent per element, in each leaf's dtype.

    One draw for the whole tree (then split into leaves): XLA compiles a random draw per call
    site, and one per leaf makes the step's compile time grow with the number of leaves.
    """
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [x.size for x in leaves]
    noise = std * jax.random.normal(key, (sum(sizes),), jnp.float32)
    parts = jnp.split(noise, np.cumsum(sizes)[:-1])
    noisy = [(x + n.reshape(x.shape)).astype(x.dtype) for x, n in zip(leaves, parts, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


# --------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformationExtraArgs, config: TrainConfig
) -> Callable:
    """The jitted ``step(state, sums, x, y) -> (state, sums)``.

    ``state`` is ``{"params", "opt_state", "batch_stats", "step"}``; ``sums`` accumulates the
    epoch's ``loss``, ``correct``, ``count`` and the optimizer's diagnostics (one value per step).
    """
    _, step_root = run_keys(config.seed)
    msam = config.optimizer == "msam"
    m = config.num_microbatches

    def forward(params, batch_stats, x, y, dropout_key):
        """Train-mode loss (float32), logits and the updated batch statistics."""
        variables = _variables(params, batch_stats)
        rngs = {"dropout": dropout_key}
        if batch_stats:
            logits, mutated = model.apply(
                variables, x, train=True, mutable=["batch_stats"], rngs=rngs
            )
            new_stats = mutated["batch_stats"]
        else:
            logits, new_stats = model.apply(variables, x, train=True, rngs=rngs), batch_stats
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, new_stats)

    def noisy(grads, key):
        return _add_normal(grads, key, config.grad_noise_std) if config.grad_noise_std else grads

    def step(state, sums, x, y):
        params, batch_stats, opt_state = state["params"], state["batch_stats"], state["opt_state"]
        k_aug, k_drop, k_noise1, k_noise2, k_param = jax.random.split(
            jax.random.fold_in(step_root, state["step"]), 5
        )
        if config.augment:
            x = augment_crop_flip(k_aug, x)
        clean = jax.value_and_grad(forward, has_aux=True)
        # The second pass: at the pre-step statistics; its statistics updates are dropped.
        second = jax.grad(lambda p, x, y, k: forward(p, batch_stats, x, y, k)[0])

        if msam:
            xs, ys = sharpjax.split_microbatches((x, y), m)
            drop_keys = jax.random.split(k_drop, m)
            (losses, (logits, stats)), grads = jax.vmap(clean, in_axes=(None, None, 0, 0, 0))(
                params, batch_stats, xs, ys, drop_keys
            )
            loss = jnp.mean(losses)
            logits = logits.reshape((-1, logits.shape[-1]))
            new_stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
            grads = noisy(grads, k_noise1)

            def grad_fn(p, j):
                g2 = second(p, xs[j], ys[j], drop_keys[j])
                return noisy(g2, jax.random.fold_in(k_noise2, j))

        else:
            (loss, (logits, new_stats)), grads = clean(params, batch_stats, x, y, k_drop)
            grads = noisy(grads, k_noise1)

            def grad_fn(p):
                return noisy(second(p, x, y, k_drop), k_noise2)

        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
        if config.param_noise_std:
            params = _add_normal(params, k_param, config.param_noise_std)
        if config.param_bias:
            params = jax.tree.map(lambda w: (w + config.param_bias).astype(w.dtype), params)

        diagnostics = sharpjax.diagnostics(opt_state)
        new_sums = {
            "loss": sums["loss"] + loss,
            "correct": sums["correct"] + jnp.sum(jnp.argmax(logits, -1) == y),
            "count": sums["count"] + y.shape[0],
            **{k: sums[k] + diagnostics[k].astype(jnp.float32) for k in diagnostics},
        }
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "batch_stats": new_stats,
            "step": state["step"] + 1,
        }
        return new_state, new_sums

    # The state and the sums are donated: one copy of the params and optimizer state on device.
    return jax.jit(step, donate_argnums=(0, 1))


# Jitted steps and predict functions of recent runs, so that runs of the same model and
# trajectory config (a resumed run, a test's repeated runs) compile once per process.
_CACHE: dict[Any, Any] = {}
_CACHE_SIZE = 8


def _cached(key: Any, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = build()
    return _CACHE[key]


def compiled_functions(
    model: nn.Module, config: TrainConfig, steps_per_epoch: int
) -> tuple[optax.GradientTransformationExtraArgs, Callable, Callable]:
    """``(tx, step, predict)`` for a run, reused across runs with the same trajectory.

    The key is the model (flax modules compare and hash by their fields), every config field
    that changes the trajectory (not :data:`~sharpjax.train.config.RUNTIME_FIELDS`) and the
    number of steps per epoch.
    """
    trajectory = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}
    key = (model, json.dumps(trajectory, sort_keys=True), steps_per_epoch)

    def build():
        tx = make_optimizer(config, steps_per_epoch)
        return tx, make_train_step(model, tx, config), make_predict(model)

    return _cached(key, build)


def _zero_sums(opt_state: Any) -> dict[str, jax.Array]:
    """Fresh (distinct, since they are donated) zero accumulators for an epoch."""
    names = ("loss", *sharpjax.diagnostics(opt_state))
    sums = {name: jnp.zeros([], jnp.float32) for name in names}
    return {**sums, "correct": jnp.zeros([], jnp.int32), "count": jnp.zeros([], jnp.int32)}


# --------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------


def make_predict(model: nn.Module) -> Callable:
    """Jitted ``predict(params, batch_stats, x) -> float32 logits`` in eval mode."""

    def predict(params, batch_stats, x):
        logits = model.apply(_variables(params, batch_stats), x, train=False)
        return logits.astype(jnp.float32)

    return jax.jit(predict)


def predict_all(predict: Callable, params: Any, batch_stats: Any, x: np.ndarray) -> np.ndarray:
    """Logits of every example, in fixed-size (padded) batches so ``predict`` compiles once."""
    size = EVAL_BATCH_SIZE
    out = []
    for start in range(0, len(x), size):
        chunk = x[start : start + size]
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(predict(params, batch_stats, chunk))[: size - pad])
    return np.concatenate(out)


def evaluate(
    predict: Callable, params: Any, batch_stats: Any, dataset: Dataset
) -> dict[str, float | None]:
    """Test loss and accuracy, clean training accuracy and memorisation (eval mode)."""
    test_logits = predict_all(predict, params, batch_stats, dataset.x_test)
    train_pred = predict_all(predict, params, batch_stats, dataset.x_train).argmax(-1)
    return {
        "test_loss": float(np.mean(metrics_lib.cross_entropy(test_logits, dataset.y_test))),
        "test_accuracy": metrics_lib.accuracy(test_logits.argmax(-1), dataset.y_test),
        "train_accuracy_clean": metrics_lib.accuracy(train_pred, dataset.y_train_clean),
        "memorization": metrics_lib.memorization(
            train_pred, dataset.y_train, dataset.y_train_clean
        ),
    }


# --------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------


# The per-example input rank each built-in model family reads: (length, channels) for the
# 1-D CNN, (height, width, channels) for the image models; the MLP flattens anything.
_MODEL_INPUT_RANK = {
    "cnn1d": 2,
    "lenet": 3,
    "resnet18": 3,
    "resnet34": 3,
    "wrn16_8": 3,
    "wrn28_10": 3,
}


def _check_data(config: TrainConfig, dataset: Dataset, model: nn.Module | None = None) -> None:
    """Checks what needs the data (batch size, augment, model input) before any compile."""
    n = len(dataset.x_train)
    if config.batch_size > n:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {n} training examples of "
            f"dataset {dataset.name!r}."
        )
    shape = tuple(dataset.x_train.shape[1:])
    if config.augment and shape[0:2] != (32, 32):
        raise ValueError(
            f"augment=True (crop + flip) is for 32x32 images; dataset {dataset.name!r} has "
            f"inputs of shape {shape}."
        )
    rank = _MODEL_INPUT_RANK.get(config.model)
    # A module passed to train() instead of config.model is checked by the shape test below.
    builtin = model is None or type(model) is type(get_model(config.model, 2))
    if builtin and rank is not None and len(shape) != rank:
        fits = sorted({"mlp", *(k for k, r in _MODEL_INPUT_RANK.items() if r == len(shape))})
        kind = "sequences (length, channels)" if rank == 2 else "images (height, width, channels)"
        raise ValueError(
            f"model={config.model!r} reads {kind}, but dataset {dataset.name!r} has inputs of "
            f"shape {shape}. Models that fit it: {', '.join(fits)}."
        )
    if model is not None:
        # Abstract evaluation (no compile, well under a second): a model that does not map
        # one example to num_classes logits fails here instead of minutes into compiling.
        def logits(x):
            rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
            return model.init_with_output(rngs, x, train=False)[0]

        sample = jax.ShapeDtypeStruct((1, *shape), dataset.x_train.dtype)
        try:
            out = jax.eval_shape(logits, sample)
        except Exception as e:  # flax/XLA shape errors: re-raise with what was asked
            raise ValueError(
                f"model={config.model!r} cannot be applied to dataset {dataset.name!r} "
                f"(inputs of shape {shape}): {type(e).__name__}: {e}"
            ) from e
        if tuple(out.shape) != (1, dataset.num_classes):
            raise ValueError(
                f"model={config.model!r} maps one input of shape {shape} (dataset "
                f"{dataset.name!r}) to logits of shape {tuple(out.shape)[1:] or tuple(out.shape)}, "
                f"not ({dataset.num_classes},): it does not fit this dataset."
            )


def _save_labels(workdir: str, dataset: Dataset) -> None:
    path = os.path.join(workdir, "labels.npz")
    with open(f"{path}.tmp", "wb") as f:
        np.savez_compressed(f, y_train=dataset.y_train, y_train_clean=dataset.y_train_clean)
    os.replace(f"{path}.tmp", path)


def train(
    config: TrainConfig, dataset: Dataset | None = None, model: nn.Module | None = None
) -> TrainResult:
    """Trains ``config.model`` on ``config.dataset`` with ``config.optimizer``.

    Args:
      config: the run (validated).
      dataset: use this instead of ``load_dataset(config.dataset, ...)`` (e.g. a dataset
        built in memory); ``config.dataset`` is then only recorded.
      model: use this flax module instead of ``get_model(config.model, ...)``; it takes
        ``(x, train)`` and may have ``batch_stats``. Its identity is not checked on resume.

    Returns:
      A :class:`TrainResult`. With ``config.workdir`` set, the run also writes
      ``config.json``, ``labels.npz``, ``metrics.jsonl`` (one line per epoch),
      ``result.json`` (when complete) and checkpoints (``checkpoint_every > 0``), and resumes
      from the latest checkpoint of an unfinished compatible run; see
      :mod:`sharpjax.train.checkpoint` for the rules that keep results from being overwritten.

    Not jittable: a host loop over epochs and batches around a jitted step.
    """
    workdir = os.path.abspath(config.workdir) if config.workdir else None
    resuming = prepare_workdir(config) if workdir else False

    if dataset is None:
        dataset = load_dataset(
            config.dataset,
            noise=config.noise,
            noise_rate=config.noise_rate,
            seed=config.seed,
            data_dir=config.data_dir,
        )
    model = model if model is not None else build_model(config, dataset.num_classes)
    _check_data(config, dataset, model)
    steps_per_epoch = len(dataset.x_train) // config.batch_size
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    tx, step_fn, predict = compiled_functions(model, config, steps_per_epoch)
    schedule = learning_rate_schedule(config, steps_per_epoch)

    params, batch_stats = init_model(model, dataset.x_train, config.seed)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "batch_stats": batch_stats,
        "step": jnp.zeros([], jnp.int32),
    }
    history: list[dict[str, Any]] = []
    start_epoch = 0

    checkpointer = None
    # A requested early stop is always checkpointed, so that the run can be resumed.
    stopping = config.stop_after_epochs is not None and config.stop_after_epochs < config.epochs
    if workdir:
        if config.checkpoint_every > 0 or resuming or stopping:
            checkpointer = Checkpointer(workdir, config.max_checkpoints)
        # The newest intact checkpoint (damaged newer ones are skipped with a warning).
        found = (
            checkpointer.restore_latest({**state, "rng": _rng_data(config)})
            if (resuming and checkpointer)
            else None
        )
        if found is not None:
            _, restored, meta = found
            restored.pop("rng")
            state = restored
            history, start_epoch = meta["history"], int(meta["epoch"])
        metrics_lib.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
        _save_labels(workdir, dataset)
        metrics_lib.write_jsonl_atomic(os.path.join(workdir, "metrics.jsonl"), history)

    # The step donates its inputs, and an init may share one buffer between leaves: copy.
    state = jax.tree.map(jnp.array, state)
    last_epoch = config.epochs
    if config.stop_after_epochs is not None:
        last_epoch = min(last_epoch, config.stop_after_epochs)

    for epoch in range(start_epoch, last_epoch):
        start = time.perf_counter()
        sums = _zero_sums(state["opt_state"])
        batches = iterate_batches(
            dataset.x_train,
            dataset.y_train,
            batch_size=config.batch_size,
            seed=config.seed,
            epoch=epoch,
        )
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not config.progress,
            leave=False,
        )
        for i, (xb, yb) in enumerate(itertools.islice(batches, steps_per_epoch)):
            state, sums = step_fn(state, sums, xb, yb)
            bar.update(1)
            if config.progress and (i % 10 == 9 or i == steps_per_epoch - 1):
                bar.set_postfix(
                    loss=f"{float(sums['loss']) / (i + 1):.4f}",
                    acc=f"{int(sums['correct']) / int(sums['count']):.3f}",
                )
        bar.close()
        sums = jax.device_get(sums)
        train_time = time.perf_counter() - start

        step = int(state["step"])
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "learning_rate": float(schedule(step - 1)),
            "train_loss": float(sums["loss"]) / steps_per_epoch,
            "train_accuracy": int(sums["correct"]) / int(sums["count"]),
            "train_accuracy_clean": None,
            "memorization": None,
            "test_loss": None,
            "test_accuracy": None,
        }
        for key in sums:
            if key not in ("loss", "correct", "count"):  # the optimizer's diagnostics
                record[key] = float(sums[key]) / steps_per_epoch
        # Not on a stop_after_epochs epoch: an interrupted run keeps the history of a whole one.
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            record.update(evaluate(predict, state["params"], state["batch_stats"], dataset))
        record["epoch_time"] = time.perf_counter() - start
        record["train_time"] = train_time
        record = metrics_lib.to_jsonable(record)
        history.append(record)

        if config.progress:
            summary = ", ".join(
                f"{k}={record[k]:.4g}"
                for k in ("train_loss", "train_accuracy", "test_accuracy", "memorization")
                if record.get(k) is not None
            )
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: {summary}")
        if workdir:
            metrics_lib.append_jsonl(os.path.join(workdir, "metrics.jsonl"), record)
            every = config.checkpoint_every
            periodic = every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == last_epoch)
            if periodic or (stopping and epoch + 1 == last_epoch):
                meta = {"epoch": epoch + 1, "history": history, "config": config.to_dict()}
                checkpointer.save(epoch + 1, {**state, "rng": _rng_data(config)}, meta)

    completed = len(history) >= config.epochs
    if checkpointer is not None:
        checkpointer.close()
    if workdir and completed:
        tests = [r["test_accuracy"] for r in history if r.get("test_accuracy") is not None]
        result = {
            "config": config.to_dict(),
            "final": history[-1],
            "best_test_accuracy": max(tests) if tests else None,
            "epochs": len(history),
            "steps": int(state["step"]),
        }
        metrics_lib.write_json_atomic(os.path.join(workdir, "result.json"), result)
    return TrainResult(
        params=state["params"],
        batch_stats=state["batch_stats"],
        opt_state=state["opt_state"],
        history=history,
        final=history[-1] if history else {},
        config=config,
        model=model,
        completed=completed,
    )


def _rng_data(config: TrainConfig) -> np.ndarray:
    """The run's root key as uint32 data (saved with checkpoints, for the record)."""
    return np.asarray(jax.random.key_data(jax.random.key(config.seed)))
