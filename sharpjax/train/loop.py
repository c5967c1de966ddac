"""The host loop around the one sharpness-aware step, sharded over every device.

The step is :func:`sharpjax.parallel.make_train_step` (see its docstring for the data flow:
augmentation, clean pass, ``tx.update(..., grad_fn=...)``, disturbances, BatchNorm statistics
from the clean pass); this module only jits it over a mesh and runs the epochs, evaluation,
checkpoints and metrics around it. It runs under plain ``jax.jit`` (GSPMD) on the mesh
``data × fsdp × model`` of ``config.mesh`` over ``config.num_devices`` devices (default: all
devices of all hosts on ``data``, params replicated): the global batch is split over
``data × fsdp``, the params and every copy of them in the optimizer and rule state over
``fsdp`` (ZeRO-3) and ``model`` (:func:`state_layout`), the BatchNorm statistics replicated.
One device is the same program on a mesh of one, and in the default ``"synced"`` perturbation
mode any mesh computes what one device computes on the same global batch.
``"per_device"``/``"grouped"`` are m-sharpness with one micro-batch per replica/group
(:func:`sharpjax.parallel.make_sharded_train_step` says why this design).

:func:`train` is three named steps: :func:`setup` (data, model, mesh, compiled step, state
placed on the mesh, resume), :func:`run_epoch` per epoch, :func:`teardown` (result files).

Input pipeline: each process gathers only its rows of every global batch
(``jax.process_index()``), and batches are transferred to the mesh two steps ahead
(:func:`sharpjax.data.prefetch_to_mesh`), so step k+1's batch moves while step k runs. The
TFDS ``data_source`` datasets are NumPy arrays once loaded and go through the same iterator.
Evaluation is sharded the same way.

Randomness: the init key, and every step's keys (augmentation, dropout, gradient noise,
parameter noise) are ``fold_in(key(seed), step)`` derivations; the batch order is a function
of ``(seed, epoch)`` (:func:`sharpjax.data.iterate_batches`). Nothing random is carried from
step to step, so resuming from a checkpoint reproduces an uninterrupted run bit for bit. The
root key and the disturbance scales are traced inputs of the step, so a seed or noise sweep
compiles it once (:func:`compiled_functions`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import sharpjax
from sharpjax import parallel
from sharpjax.data import (
    Dataset,
    augment_crop_flip,
    iterate_batches,
    load_dataset,
    prefetch_to_mesh,
)
from sharpjax.efficient import plan_second_gradient, planned_step
from sharpjax.models import get_model
from sharpjax.train import metrics as metrics_lib
from sharpjax.train.checkpoint import Checkpointer, prepare_workdir
from sharpjax.train.config import (
    DECIDED_AHEAD,
    DECIDED_FROM_GRADIENT,
    RUNTIME_FIELDS,
    TrainConfig,
    learning_rate_schedule,
    make_optimizer,
    perturbation_microbatches,
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
    variables = _unboxed(_init_variables(model, jnp.asarray(sample[:1]), seed))
    return variables["params"], variables.get("batch_stats", {})


def _init_variables(model: nn.Module, sample: Any, seed: int) -> Any:
    """``model.init`` as the trainer calls it (under ``jax.eval_shape`` too: nothing runs)."""
    init_key, _ = run_keys(seed)
    params_key, dropout_key = jax.random.split(init_key)
    return model.init({"params": params_key, "dropout": dropout_key}, sample, train=False)


def _has_boxes(tree: Any) -> bool:
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return any(is_box(x) for x in jax.tree.leaves(tree, is_leaf=is_box))


def _unboxed(variables: Any) -> Any:
    """Plain arrays: models with partitioning annotations (the transformers) return boxes."""
    if not _has_boxes(variables):
        return variables
    from sharpjax.models import partitioning

    return partitioning.unbox(variables)


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


# --------------------------------------------------------------------------------------
# The step: sharpjax.parallel.make_train_step, jitted over the mesh with the epoch's sums.
# --------------------------------------------------------------------------------------

# Config fields that the compiled program does not depend on: the seed and the disturbance
# scales are traced arguments of the step, and the label noise only changes the data. A sweep
# over them reuses one compiled step (see compiled_functions).
TRACED_FIELDS = (
    "seed",
    "noise",
    "noise_rate",
    "grad_noise_std",
    "param_noise_std",
    "param_bias",
)


def make_loss_fn(model: nn.Module) -> Callable:
    """``loss_fn(params, batch_stats, (x, y), rng=dropout_key)`` for the one step.

    Train mode; float32 cross-entropy (also under mixed precision) and accuracy as metric.
    """

    def loss_fn(params, batch_stats, batch, rng):
        x, y = batch
        variables = _variables(params, batch_stats)
        rngs = {"dropout": rng}
        if batch_stats:
            logits, mutated = model.apply(
                variables, x, train=True, mutable=["batch_stats"], rngs=rngs
            )
            new_stats = mutated["batch_stats"]
        else:
            logits, new_stats = model.apply(variables, x, train=True, rngs=rngs), batch_stats
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        accuracy = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
        return loss, (new_stats, {"accuracy": accuracy})

    return loss_fn


def step_inputs(config: TrainConfig, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The traced per-run inputs of the step: root key and disturbance scales, replicated."""
    _, step_root = run_keys(config.seed)
    hyper = {
        # Raw key data: a typed key array cannot be laid out across hosts by device_put.
        "key": jax.random.key_data(step_root),
        "disturbances": parallel.Disturbances(
            np.float32(config.grad_noise_std),
            np.float32(config.param_noise_std),
            np.float32(config.param_bias),
        ),
    }
    return parallel.replicate_on(mesh, hyper)


def train_mesh(config: TrainConfig) -> jax.sharding.Mesh:
    """The run's mesh ``data × fsdp × model``: ``config.mesh`` over ``config.num_devices``."""
    return parallel.make_train_mesh(config.mesh, config.num_devices)


def state_layout(
    model: nn.Module,
    tx: optax.GradientTransformationExtraArgs,
    mesh: jax.sharding.Mesh,
    sample: jax.ShapeDtypeStruct | None = None,
) -> dict[str, Any]:
    """Where the trainer's state ``{"params", "opt_state", "batch_stats", "step"}`` lives.

    Params split over ``fsdp``/``model`` (:func:`sharpjax.parallel.param_shardings`, with the
    model's logical annotations and :data:`sharpjax.models.partitioning.LOGICAL_AXIS_RULES`
    when it has them), every copy of the params in the optimizer and rule state likewise,
    BatchNorm statistics and the step counter replicated. ``sample``: one input example
    (abstract: nothing is allocated); not needed on a mesh that splits no params, where the
    whole state is replicated.
    """
    replicated = NamedSharding(mesh, P())
    if parallel.replica_size(mesh) == 1:
        return {
            "params": replicated,
            "opt_state": replicated,
            "batch_stats": replicated,
            "step": replicated,
        }
    if sample is None:
        raise ValueError("state_layout: a mesh that splits the params needs the input sample.")
    variables = jax.eval_shape(lambda x: _init_variables(model, x, 0), sample)
    logical, rules = None, None
    if _has_boxes(variables):
        from sharpjax.models import partitioning

        logical = partitioning.logical_partition_specs(variables)["params"]
        rules = partitioning.rules_for_mesh(mesh.axis_names)
        variables = partitioning.unbox(variables)
    shardings = parallel.state_shardings(
        tx,
        variables["params"],
        variables.get("batch_stats", {}),
        mesh,
        logical_specs=logical,
        rules=rules,
    )
    return {
        "params": shardings.params,
        "opt_state": shardings.opt_state,
        "batch_stats": replicated,
        "step": replicated,
    }


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformationExtraArgs,
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    layout: dict[str, Any] | None = None,
) -> Callable:
    """The jitted ``step(state, sums, batch, hyper) -> (state, sums)`` of the trainer.

    It runs :func:`sharpjax.parallel.make_train_step` (the one sharpness-aware step) under
    ``jax.jit`` with ``batch = (x, y)`` split over the mesh's batch axes, the state laid out as
    ``layout`` says (:func:`state_layout`; default: replicated) and kept so, and adds its
    metrics to the epoch's ``sums`` on device. ``state`` is ``{"params", "opt_state",
    "batch_stats", "step"}``; ``hyper`` is :func:`step_inputs` (the step's key is
    ``fold_in(hyper["key"], state["step"])``).

    On CPU devices the efficient variants avoid ``lax.cond`` (a conv gradient under it runs
    many times slower on XLA:CPU, ``experiments/bench_cond.py``): LookSAM and RST, whose
    policy decides ahead, run as :func:`sharpjax.efficient.planned_step` (two programs, with
    and without the second gradient, chosen on the host before each step); AE-SAM, whose
    decision needs this step's ‖g‖², runs the step's two halves as programs of their own (the
    clean gradient and the decision, then the update with or without the second gradient).
    Elsewhere: one program with the ``lax.cond``. Neither path is free everywhere: deciding on
    the host reads the device state before every step (no asynchronous dispatch across steps),
    measured at 1.6-3.5x the ``lax.cond`` step's time for a 3 ms MLP step on CPU, while a conv
    under ``lax.cond`` is many times slower on XLA:CPU.
    """
    layout = layout or state_layout(model, tx, mesh)
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    if on_cpu and config.optimizer in DECIDED_AHEAD:
        return planned_step(
            lambda decision: _make_train_step(model, tx, config, mesh, decision, layout),
            lambda state, *_: state["opt_state"],
        )
    if on_cpu and config.optimizer in DECIDED_FROM_GRADIENT:
        return _make_split_train_step(model, tx, config, mesh, layout)
    return _make_train_step(model, tx, config, mesh, None, layout)


def _step_parts(
    model: nn.Module,
    tx: optax.GradientTransformationExtraArgs,
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    split: bool = False,
    second_gradient: bool | None = None,
) -> tuple[Any, Callable, Callable]:
    """The core step (:func:`sharpjax.parallel.make_train_step`), and the trainer's wrapping:
    ``inputs(state, hyper) -> (train_state, key, disturbances)`` and
    ``finish(state, sums, new, metrics) -> (state, sums)``."""
    core_step = parallel.make_train_step(
        make_loss_fn(model),
        tx,
        num_micro_steps=config.num_micro_steps,
        num_microbatches=_perturbations(config, mesh),
        augment=(lambda key, b: (augment_crop_flip(key, b[0]), b[1])) if config.augment else None,
        loss_takes_rng=True,
        second_gradient=second_gradient,
        split=split,
    )
    disturbed = bool(config.grad_noise_std or config.param_noise_std or config.param_bias)

    def inputs(state, hyper):
        key = jax.random.fold_in(jax.random.wrap_key_data(hyper["key"]), state["step"])
        train_state = parallel.TrainState(state["params"], state["batch_stats"], state["opt_state"])
        # Runs without disturbances skip them at trace time; a sweep over non-zero scales (or
        # over seeds) still compiles once, since the scales are traced.
        return train_state, key, hyper["disturbances"] if disturbed else None

    def finish(state, sums, new, metrics):
        new_sums = {}
        for k in sums:
            if k.startswith(MEASURED):
                continue
            if k in TRAIN_SUMS:
                new_sums[k] = sums[k] + metrics[k]
            else:  # a diagnostic: NaN means not measured yet (SharpnessAwareState's convention)
                measured = ~jnp.isnan(metrics[k])
                new_sums[k] = sums[k] + jnp.where(measured, metrics[k], 0.0)
                new_sums[MEASURED + k] = sums[MEASURED + k] + measured.astype(jnp.float32)
        new_state = {
            "params": new.params,
            "opt_state": new.opt_state,
            "batch_stats": new.model_state,
            "step": state["step"] + 1,
        }
        return new_state, new_sums

    return core_step, inputs, finish


def _perturbations(config: TrainConfig, mesh: jax.sharding.Mesh) -> int:
    """The step's ``num_microbatches``: ε per global batch for the config's mode on ``mesh``."""
    return perturbation_microbatches(config, mesh.devices.size, parallel.replica_size(mesh))


def _make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformationExtraArgs,
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    second_gradient: bool | None,
    layout: dict[str, Any] | None = None,
) -> Callable:
    one_step, inputs, finish = _step_parts(model, tx, config, mesh, second_gradient=second_gradient)
    layout = layout or state_layout(model, tx, mesh)

    def step(state, sums, batch, hyper):
        train_state, key, disturbances = inputs(state, hyper)
        return finish(state, sums, *one_step(train_state, batch, key, disturbances))

    replicated = NamedSharding(mesh, P())
    batched = parallel.batch_sharding(mesh)
    # The state and the sums are donated: one copy of the params and optimizer state on device.
    return jax.jit(
        step,
        in_shardings=(layout, replicated, batched, replicated),
        out_shardings=(layout, replicated),
        donate_argnums=(0, 1),
    )


def _make_split_train_step(
    model: nn.Module,
    tx: optax.GradientTransformationExtraArgs,
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    layout: dict[str, Any] | None = None,
) -> Callable:
    """:func:`make_train_step` for AE-SAM on CPU: the clean half and the decision in one
    program, the update (with or without the second gradient) in one of two others."""
    halves, inputs, finish = _step_parts(model, tx, config, mesh, split=True)
    layout = layout or state_layout(model, tx, mesh)

    def clean(state, batch, hyper):
        train_state, key, disturbances = inputs(state, hyper)
        pass_ = halves.clean(train_state, batch, key, disturbances)
        return pass_, plan_second_gradient(state["opt_state"], pass_.grads)

    def update(state, sums, batch, hyper, pass_, decision):
        train_state, key, disturbances = inputs(state, hyper)
        new, metrics = halves.update(
            train_state, batch, pass_, key, disturbances, second_gradient=decision
        )
        return finish(state, sums, new, metrics)

    replicated = NamedSharding(mesh, P())
    batched = parallel.batch_sharding(mesh)
    # The clean pass's gradient keeps the layout GSPMD gives it (the params' on an fsdp mesh).
    clean_program = jax.jit(clean, in_shardings=(layout, batched, replicated))
    update_programs = {
        decision: jax.jit(
            functools.partial(update, decision=decision),
            in_shardings=(layout, replicated, batched, replicated, None),
            out_shardings=(layout, replicated),
            donate_argnums=(0, 1),
        )
        for decision in (True, False)
    }

    def step(state, sums, batch, hyper):
        pass_, decision = clean_program(state, batch, hyper)
        # bool() waits for the clean program: the decision picks the next program.
        return update_programs[bool(decision)](state, sums, batch, hyper, pass_)

    return step


# Jitted steps and predict functions of recent runs, so that runs of the same model and
# program (a resumed run, a seed or noise sweep, a test's repeated runs) compile once per
# process.
_CACHE: dict[Any, Any] = {}
_CACHE_SIZE = 8


def _cached(key: Any, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = build()
    return _CACHE[key]


def compiled_functions(
    model: nn.Module,
    config: TrainConfig,
    steps_per_epoch: int,
    mesh: jax.sharding.Mesh | None = None,
    sample: jax.ShapeDtypeStruct | None = None,
) -> tuple[optax.GradientTransformationExtraArgs, Callable, Callable]:
    """``(tx, step, predict)`` for a run, reused across runs that compile to the same program.

    The key is the model (flax modules compare and hash by their fields), every config field
    that changes the program (not :data:`~sharpjax.train.config.RUNTIME_FIELDS` nor
    :data:`TRACED_FIELDS`, except whether any disturbance is on), the number of steps per epoch
    and the mesh (its devices and axes). So a sweep over seeds, label noise or disturbance
    scales reuses one jitted step, which compiles once per input shape. ``sample`` (one
    abstract input example) is needed on a mesh that splits the params (:func:`state_layout`).
    """
    return _compiled(model, config, steps_per_epoch, mesh, sample)[:3]


def _compiled(
    model: nn.Module,
    config: TrainConfig,
    steps_per_epoch: int,
    mesh: jax.sharding.Mesh | None,
    sample: jax.ShapeDtypeStruct | None,
) -> tuple[Any, Callable, Callable, dict[str, Any]]:
    """:func:`compiled_functions` and the state's layout."""
    mesh = mesh if mesh is not None else train_mesh(config)
    program = {
        k: v
        for k, v in config.to_dict().items()
        if k not in RUNTIME_FIELDS and k not in TRACED_FIELDS
    }
    disturbed = bool(config.grad_noise_std or config.param_noise_std or config.param_bias)
    key = (
        model,
        json.dumps(program, sort_keys=True),
        disturbed,
        steps_per_epoch,
        tuple(d.id for d in mesh.devices.flat),
        tuple(mesh.shape.items()),
        # The input's shape sets the params' shapes, hence their layout on a mesh that splits them.
        (tuple(sample.shape), str(sample.dtype))
        if sample and parallel.replica_size(mesh) > 1
        else None,
    )

    def build():
        m = _perturbations(config, mesh)
        # The micro-batches' second passes under vmap: on several devices GSPMD runs each on
        # its own replica (a scan would gather them everywhere), and on XLA:CPU a conv gradient
        # inside a scan body is many times slower (experiments/bench_cond.py). The trainer's
        # models are small enough for m perturbed copies of the params.
        tx = make_optimizer(
            config, steps_per_epoch, num_microbatches=m, microbatch_execution="parallel"
        )
        layout = state_layout(model, tx, mesh, sample)
        step = make_train_step(model, tx, config, mesh, layout)
        return tx, step, make_predict(model, mesh, layout["params"]), layout

    return _cached(key, build)


# The epoch sums count, for each diagnostic, the steps that measured it (key MEASURED + name).
MEASURED = "measured:"
TRAIN_SUMS = ("loss", "accuracy")


def _zero_sums(opt_state: Any, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Fresh (distinct, since they are donated) zero accumulators for an epoch, replicated."""
    # the step's own loss and accuracy replace the diagnostics' "loss" (the same clean loss)
    diagnostic_names = tuple(k for k in sharpjax.diagnostics(opt_state) if k not in TRAIN_SUMS)
    names = (*TRAIN_SUMS, *diagnostic_names, *(MEASURED + k for k in diagnostic_names))
    return parallel.replicate_on(mesh, {name: np.zeros([], np.float32) for name in names})


# --------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------


def make_predict(model: nn.Module, mesh: jax.sharding.Mesh, params_layout: Any = None) -> Callable:
    """Jitted ``predict(params, batch_stats, x) -> float32 logits`` in eval mode.

    ``x`` is split over ``mesh``'s batch axes, the params laid out as ``params_layout`` says
    (default: replicated); the logits come back replicated, so every process can read all of
    them.
    """

    def predict(params, batch_stats, x):
        logits = model.apply(_variables(params, batch_stats), x, train=False)
        return logits.astype(jnp.float32)

    replicated = NamedSharding(mesh, P())
    params_layout = replicated if params_layout is None else params_layout
    jitted = jax.jit(
        predict,
        in_shardings=(params_layout, replicated, parallel.batch_sharding(mesh)),
        out_shardings=replicated,
    )
    return _Predict(jitted, mesh)


@dataclasses.dataclass(frozen=True)
class _Predict:
    """A jitted predict function and the mesh its inputs are sharded over."""

    fn: Callable
    mesh: jax.sharding.Mesh

    def __call__(self, params: Any, batch_stats: Any, x: Any) -> jax.Array:
        return self.fn(params, batch_stats, x)


def predict_all(predict: Callable, params: Any, batch_stats: Any, x: np.ndarray) -> np.ndarray:
    """Logits of every example, in fixed-size (padded) batches so ``predict`` compiles once.

    The batch size is ``EVAL_BATCH_SIZE`` rounded up to a multiple of the mesh's batch shards;
    every process holds ``x`` (evaluation sets are small) and the chunks are sharded from it.
    """
    mesh = predict.mesh
    n = parallel.batch_shards(mesh)
    size = -(-EVAL_BATCH_SIZE // n) * n
    sharding = parallel.batch_sharding(mesh)
    out = []
    for start in range(0, len(x), size):
        chunk = x[start : start + size]
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        chunk = jax.make_array_from_callback(chunk.shape, sharding, lambda i, c=chunk: c[i])
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
      ``config.json`` (with the resolved ``num_devices`` and ``mesh``), ``labels.npz``,
      ``metrics.jsonl`` (one line per epoch), ``result.json`` (when complete) and checkpoints
      (``checkpoint_every > 0``), and resumes from the latest checkpoint of an unfinished
      compatible run, on any mesh; see :mod:`sharpjax.train.checkpoint` for the rules that
      keep results from being overwritten.

    Not jittable: a host loop over epochs and batches around a jitted step.
    """
    run = setup(config, dataset, model)
    for epoch in range(run.start_epoch, run.last_epoch):
        run_epoch(run, epoch)
    return teardown(run)


@dataclasses.dataclass
class Run:
    """A run between :func:`setup` and :func:`teardown`: what it was built with, and its
    state (on the mesh) and history so far."""

    config: TrainConfig
    resolved: TrainConfig  # num_devices and mesh as they ran: what config.json records
    dataset: Dataset
    model: nn.Module
    mesh: jax.sharding.Mesh
    steps_per_epoch: int
    step_fn: Callable
    predict: Callable
    hyper: dict[str, Any]
    schedule: optax.Schedule
    state: dict[str, Any]
    history: list[dict[str, Any]]
    start_epoch: int
    last_epoch: int
    workdir: str | None
    checkpointer: Checkpointer | None
    stopping: bool  # stop_after_epochs ends the run early (always checkpointed)


def setup(
    config: TrainConfig, dataset: Dataset | None = None, model: nn.Module | None = None
) -> Run:
    """Everything before the first step: the workdir's rules, data, model, mesh (checked before
    anything compiles), the compiled step, the state placed on the mesh, and the resume."""
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
    mesh = train_mesh(config)
    parallel.check_global_batch(
        config.batch_size,
        mesh.devices.size,
        config.num_micro_steps,
        _perturbations(config, mesh),
        parallel.batch_shards(mesh),
    )
    resolved = config.replace(num_devices=int(mesh.devices.size), mesh=parallel.format_mesh(mesh))
    if resuming:
        _check_resume_mesh(config, workdir, mesh)
    steps_per_epoch = len(dataset.x_train) // config.batch_size
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    sample = jax.ShapeDtypeStruct((1, *dataset.x_train.shape[1:]), dataset.x_train.dtype)
    tx, step_fn, predict, layout = _compiled(model, config, steps_per_epoch, mesh, sample)

    params, batch_stats = init_model(model, dataset.x_train, config.seed)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "batch_stats": batch_stats,
        "step": np.zeros([], np.int32),
    }
    # Laid out on the mesh in fresh buffers (the step donates them, and an init may share one
    # buffer between leaves); a checkpoint is restored straight into this layout, whatever
    # mesh it was saved from.
    state = parallel.put_global(state, _full_layout(layout, state))
    run = Run(
        config=config,
        resolved=resolved,
        dataset=dataset,
        model=model,
        mesh=mesh,
        steps_per_epoch=steps_per_epoch,
        step_fn=step_fn,
        predict=predict,
        hyper=step_inputs(config, mesh),
        schedule=learning_rate_schedule(config, steps_per_epoch),
        state=state,
        history=[],
        start_epoch=0,
        last_epoch=min(config.epochs, config.stop_after_epochs or config.epochs),
        workdir=workdir,
        checkpointer=None,
        stopping=config.stop_after_epochs is not None and config.stop_after_epochs < config.epochs,
    )
    _announce(run)
    if workdir:
        _open_workdir(run, resuming)
    return run


def _full_layout(layout: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """``layout`` with one sharding per leaf of ``state`` (it may hold one for a subtree)."""
    return {
        k: jax.tree.map(lambda _, s=v: s, state[k]) if isinstance(v, jax.sharding.Sharding) else v
        for k, v in layout.items()
    }


def _check_resume_mesh(config: TrainConfig, workdir: str, mesh: jax.sharding.Mesh) -> None:
    """A run may resume on another mesh, unless its mode would then take another number of
    perturbations per batch (per-device / grouped modes count replicas)."""
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    if config.perturbation_mode == "synced" or saved.get("mesh") is None:
        return
    shape = parallel.parse_mesh(saved["mesh"], saved.get("num_devices"))
    before = perturbation_microbatches(config, saved["num_devices"], shape["fsdp"] * shape["model"])
    now = _perturbations(config, mesh)
    if before != now:
        raise ValueError(
            f"The workdir {workdir} holds a run with perturbation_mode="
            f"{config.perturbation_mode!r} on mesh={saved['mesh']!r} ({before} perturbations per "
            f"batch); on mesh={parallel.format_mesh(mesh)!r} it would take {now}: resume on a "
            "mesh with as many replicas (data), or use another workdir."
        )


def _open_workdir(run: Run, resuming: bool) -> None:
    """Checkpointer, resume from the newest intact checkpoint, config/labels/metrics files."""
    config, workdir = run.config, run.workdir
    if config.checkpoint_every > 0 or resuming or run.stopping:
        run.checkpointer = Checkpointer(workdir, config.max_checkpoints)
    if resuming and run.checkpointer:
        found = run.checkpointer.restore_latest({**run.state, "rng": _rng_data(config)})
        if found is not None:
            epoch, restored, meta = found
            restored.pop("rng")
            run.state, run.history, run.start_epoch = restored, meta["history"], int(meta["epoch"])
            if config.progress:
                path = os.path.join(run.checkpointer.directory, str(epoch))
                print(f"resuming from {path} (epoch {epoch})", file=sys.stderr)
    metrics_lib.write_json_atomic(os.path.join(workdir, "config.json"), run.resolved.to_dict())
    _save_labels(workdir, run.dataset)
    metrics_lib.write_jsonl_atomic(os.path.join(workdir, "metrics.jsonl"), run.history)


def _announce(run: Run) -> None:
    """One line on the device layout (with ``progress``), on stderr beside the progress bars."""
    if not run.config.progress or jax.process_index() != 0:
        return
    per_device = run.config.batch_size // parallel.batch_shards(run.mesh)
    print(
        f"mesh {parallel.format_mesh(run.mesh)} on {run.mesh.devices.size} "
        f"{run.mesh.devices.flat[0].platform} device(s), {jax.process_count()} process(es); "
        f"batch {run.config.batch_size} = {per_device} per device",
        file=sys.stderr,
    )


def run_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One epoch: the steps on this process's rows of each global batch, evaluation, the
    metrics line and the checkpoint. Returns the epoch's record."""
    config = run.config
    start = time.perf_counter()
    sums = _zero_sums(run.state["opt_state"], run.mesh)
    local = iterate_batches(
        run.dataset.x_train,
        run.dataset.y_train,
        batch_size=config.batch_size,
        seed=config.seed,
        epoch=epoch,
        num_shards=jax.process_count(),
        shard_index=jax.process_index(),
    )
    # On the mesh two steps ahead.
    batches = prefetch_to_mesh(
        itertools.islice(local, run.steps_per_epoch), run.mesh, parallel.batch_axes(run.mesh)
    )
    bar = tqdm(
        total=run.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not config.progress,
        leave=False,
    )
    state = run.state
    for i, batch in enumerate(batches):
        state, sums = run.step_fn(state, sums, batch, run.hyper)
        bar.update(1)
        if config.progress and (i % 10 == 9 or i == run.steps_per_epoch - 1):
            bar.set_postfix(
                loss=f"{float(sums['loss']) / (i + 1):.4f}",
                acc=f"{float(sums['accuracy']) / (i + 1):.3f}",
            )
    bar.close()
    run.state = state
    sums = jax.device_get(sums)
    train_time = time.perf_counter() - start

    record = _epoch_record(run, epoch, sums)
    # Not on a stop_after_epochs epoch: an interrupted run keeps the history of a whole one.
    if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
        record.update(evaluate(run.predict, state["params"], state["batch_stats"], run.dataset))
    record["epoch_time"] = time.perf_counter() - start
    record["train_time"] = train_time
    record = metrics_lib.to_jsonable(record)
    run.history.append(record)
    if config.progress:
        summary = ", ".join(
            f"{k}={record[k]:.4g}"
            for k in ("train_loss", "train_accuracy", "test_accuracy", "memorization")
            if record.get(k) is not None
        )
        tqdm.write(f"epoch {epoch + 1}/{config.epochs}: {summary}")
    if run.workdir:
        metrics_lib.append_jsonl(os.path.join(run.workdir, "metrics.jsonl"), record)
        every = config.checkpoint_every
        periodic = every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == run.last_epoch)
        if periodic or (run.stopping and epoch + 1 == run.last_epoch):
            meta = {"epoch": epoch + 1, "history": run.history, "config": run.resolved.to_dict()}
            run.checkpointer.save(epoch + 1, {**state, "rng": _rng_data(config)}, meta)
    return record


def _epoch_record(run: Run, epoch: int, sums: dict[str, Any]) -> dict[str, Any]:
    """The epoch's training means (loss, accuracy, the optimizer's diagnostics)."""
    n = run.steps_per_epoch
    step = int(run.state["step"])
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": step,
        "learning_rate": float(run.schedule(step - 1)),
        "train_loss": float(sums["loss"]) / n,
        "train_accuracy": float(sums["accuracy"]) / n,
        "train_accuracy_clean": None,
        "memorization": None,
        "test_loss": None,
        "test_accuracy": None,
    }
    for key in sums:
        if key not in TRAIN_SUMS and not key.startswith(MEASURED):
            # the optimizer's diagnostics: the mean over the steps that measured them
            measured = float(sums[MEASURED + key])
            record[key] = float(sums[key]) / measured if measured else None
    return record


def teardown(run: Run) -> TrainResult:
    """Closes the checkpointer, writes ``result.json`` when the run is complete."""
    completed = len(run.history) >= run.config.epochs
    if run.checkpointer is not None:
        run.checkpointer.close()
    if run.workdir and completed:
        tests = [r["test_accuracy"] for r in run.history if r.get("test_accuracy") is not None]
        result = {
            "config": run.resolved.to_dict(),
            "final": run.history[-1],
            "best_test_accuracy": max(tests) if tests else None,
            "epochs": len(run.history),
            "steps": int(run.state["step"]),
        }
        metrics_lib.write_json_atomic(os.path.join(run.workdir, "result.json"), result)
    return TrainResult(
        params=run.state["params"],
        batch_stats=run.state["batch_stats"],
        opt_state=run.state["opt_state"],
        history=run.history,
        final=run.history[-1] if run.history else {},
        config=run.config,
        model=run.model,
        completed=completed,
    )


def _rng_data(config: TrainConfig) -> np.ndarray:
    """The run's root key as uint32 data (saved with checkpoints, for the record)."""
    return np.asarray(jax.random.key_data(jax.random.key(config.seed)))
