"""THE sharpness-aware training step, and the ways to run it on many devices and hosts.

One step (:func:`make_train_step`), whatever runs it, on its batch::

    (loss, aux), g = value_and_grad(loss_fn)(w, model_state, batch)   clean pass
    value_and_grad_fn = p ↦ value_and_grad(loss_fn)(p, model_state, batch) at fixed model state
    updates, opt   = tx.update(g, opt, w, value_and_grad_fn=..., loss=loss)  ε, 2nd pass
    w              = w + updates
    model_state    = the clean pass's new model state (BatchNorm statistics)

plus optional augmentation, dropout keys, gradient accumulation, m-sharpness micro-batches,
gradient/parameter noise and parameter bias (traced scales, :class:`Disturbances`), and the
optimizer's diagnostics in its metrics. ``sharpjax.train`` runs exactly this function.

Three ways to run it on N devices:

* :func:`make_sharded_train_step` (the trainer's way): plain ``jax.jit`` (GSPMD) over a
  :func:`make_train_mesh` ``data × fsdp × model``: the global batch split over ``data ×
  fsdp``, the params and every copy of them in the optimizer and rule state split over
  ``fsdp`` (ZeRO-3, :func:`param_shardings`) and ``model`` (flax logical annotations), or all
  replicated (all devices on ``data``); no ``axis_name``. Synced mode is then literally one
  device's program on the global batch, GSPMD inserting the gathers and reductions;
  per-device and grouped modes are m-sharpness with one micro-batch per replica or per group
  (:func:`perturbation_microbatches`). This is the simplest design that gives every mode: no
  cast to "varying", BatchNorm over the global batch for free, the same random draws as on
  one device, the same code on one host or many.
* :func:`make_pmap_train_step`: ``jax.pmap`` over the local devices; the state is replicated
  with a leading device axis (:func:`replicate`), the batch has shape ``(devices, B/devices, ...)``.
* :func:`make_shard_map_train_step`: ``jax.jit`` of ``jax.shard_map`` over a
  ``jax.sharding.Mesh``. Params and model state are replicated; the optimizer state is
  replicated too, except the leaves that differ between devices (VaSSO's ``d`` in per-device
  mode), which get a leading device axis sharded over the mesh.

With pmap and shard_map, ``tx``'s sharpjax transformation is built with the step's
``axis_name`` (e.g. ``sharpjax.sam(0.05, axis_name="batch", perturbation_mode="synced")``):
it averages the final gradient over the axis and decides which gradient the perturbation uses
(see :func:`sharpjax.sharpness_aware`); the steps never average gradients themselves.

Under ``shard_map`` with its default checks (``check_vma=True``), the gradient with respect to
a replicated (device-invariant) parameter comes back already summed over the devices. The step
therefore casts the params to device-varying (:func:`to_varying`, ``jax.lax.pcast``) before
each differentiation, so that the per-device and grouped perturbation modes see the device's
local gradient. Write your own shard_map step the same way.

Gradient accumulation (``num_micro_steps = k``): each device's shard is split into k
micro-batches of equal size. Pass 1 accumulates the clean gradient over the k micro-batches
(``lax.scan``), ε is computed once from the accumulated gradient, and pass 2 accumulates the
gradient at ``w + ε`` over the same micro-batches (:func:`accumulated_grad_fn`). With a loss
that is a mean over examples this is exactly SAM on the whole shard, at the activation memory of
one micro-batch (the accumulators cost one gradient each). It is not mSAM: ε is shared by the
micro-batches (for mSAM see :func:`sharpjax.msam` or the per-device mode).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharpjax.optimizers import _check_count, split_microbatches

Params = Any
ModelState = Any
Batch = Any
Metrics = dict[str, jax.Array]
LossFn = Callable[[Params, ModelState, Batch], tuple[jax.Array, tuple[ModelState, Metrics]]]
"""``loss_fn(params, model_state, batch) -> (loss, (new_model_state, metrics))``.

``loss`` is a scalar, the mean over the examples of ``batch`` (gradient accumulation and the
device average rely on it); ``model_state`` is the mutable model state (flax's
``batch_stats``; ``{}`` or ``None`` when there is none); ``metrics`` a dict of scalars.
Use :func:`stateless` to wrap a plain ``loss(params, batch)``.
"""


class TrainState(NamedTuple):
    """What a training step carries: params, mutable model state, optimizer state."""

    params: Params
    model_state: ModelState
    opt_state: optax.OptState


def stateless(loss: Callable[[Params, Batch], jax.Array]) -> LossFn:
    """Wraps ``loss(params, batch) -> scalar`` into a :data:`LossFn` with no model state."""

    def loss_fn(params, model_state, batch):
        return loss(params, batch), (model_state, {})

    return loss_fn


# --------------------------------------------------------------------------------------
# Varying / invariant values under shard_map.
# --------------------------------------------------------------------------------------


def _varying_axes(x: Any) -> frozenset:
    """Mesh axes along which ``x`` may differ between devices (shard_map's type, else empty)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # older jax


def to_varying(tree: Any, axis_name: str | None) -> Any:
    """Marks every leaf as device-varying along ``axis_name`` (``jax.lax.pcast(to="varying")``).

    Under ``jax.shard_map`` with ``check_vma=True``, ``jax.grad`` with respect to a replicated
    (device-invariant) value returns the gradient summed over the devices; with respect to a
    device-varying value, the device's local gradient. Leaves that already vary are left alone;
    under ``jax.pmap`` and outside any map the cast is a no-op. ``axis_name=None``: identity.
    """
    if axis_name is None:
        return tree

    def cast(x):
        if axis_name in _varying_axes(x):
            return x
        return jax.lax.pcast(x, axis_name, to="varying")

    return jax.tree.map(cast, tree)


# --------------------------------------------------------------------------------------
# Micro-steps (gradient accumulation).
# --------------------------------------------------------------------------------------


def _check_num_micro_steps(num_micro_steps: int) -> None:
    _check_count("num_micro_steps", num_micro_steps)


def split_micro_steps(batch: Batch, num_micro_steps: int) -> Batch:
    """Reshapes every array of a (per-device) batch from ``(B, ...)`` to ``(k, B/k, ...)``."""
    return split_microbatches(batch, num_micro_steps, argument="num_micro_steps")


def _zeros_f32(params: Params, axis_name: str | None) -> Any:
    zeros = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params)
    return to_varying(zeros, axis_name)


def _accumulate(acc: Any, g: Any) -> Any:
    return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)


def _finish_mean(acc: Any, params: Params, num_micro_steps: int) -> Any:
    return jax.tree.map(lambda a, w: (a / num_micro_steps).astype(w.dtype), acc, params)


def _loss_at(loss_fn: LossFn, rng: jax.Array | None) -> LossFn:
    """``loss_fn`` with its ``rng`` keyword bound (dropout), or ``loss_fn`` itself when None."""
    if rng is None:
        return loss_fn
    return lambda params, model_state, batch: loss_fn(params, model_state, batch, rng=rng)


def _micro_keys(rng: jax.Array | None, num_micro_steps: int) -> jax.Array | None:
    """One key per micro-step (the same in both passes), or None when there is no ``rng``."""
    return None if rng is None else jax.random.split(rng, num_micro_steps)


def accumulated_value_and_grad_fn(
    loss_fn: LossFn,
    model_state: ModelState,
    batch: Batch,
    num_micro_steps: int = 1,
    *,
    axis_name: str | None = None,
    rng: jax.Array | None = None,
) -> Callable[[Params], tuple[jax.Array, Any]]:
    """``value_and_grad_fn(params) -> (loss, gradient)`` of ``loss_fn`` on ``batch``.

    At fixed ``model_state``: the model-state updates and metrics of ``loss_fn`` are dropped
    (the perturbed pass must not move BatchNorm statistics). With ``num_micro_steps = k > 1``
    the batch is split into k equal micro-batches and loss and gradient are their means,
    accumulated in float32 by ``lax.scan``: the full-batch gradient at the activation memory of
    one micro-batch. With ``axis_name`` (under ``shard_map``) the params are cast to
    device-varying first, so the gradient is the device's own (see :func:`to_varying`). With
    ``rng`` (a key), ``loss_fn`` is called with ``rng=`` (its dropout key; micro-step i gets
    ``split(rng, k)[i]``, as in :func:`make_train_step`'s clean pass).
    """
    _check_num_micro_steps(num_micro_steps)

    def value_and_grad_fn(params):
        params = to_varying(params, axis_name)
        if num_micro_steps == 1:
            loss_only = lambda p: _loss_at(loss_fn, rng)(p, model_state, batch)[0]
            return jax.value_and_grad(loss_only)(params)

        def body(acc, inputs):
            micro_batch, key = inputs
            loss_only = lambda p: _loss_at(loss_fn, key)(p, model_state, micro_batch)[0]
            loss, g = jax.value_and_grad(loss_only)(params)
            return _accumulate(acc, g), loss

        acc, losses = jax.lax.scan(
            body,
            _zeros_f32(params, axis_name),
            (split_micro_steps(batch, num_micro_steps), _micro_keys(rng, num_micro_steps)),
        )
        return jnp.mean(losses.astype(jnp.float32)), _finish_mean(acc, params, num_micro_steps)

    return value_and_grad_fn


def accumulated_grad_fn(
    loss_fn: LossFn,
    model_state: ModelState,
    batch: Batch,
    num_micro_steps: int = 1,
    *,
    axis_name: str | None = None,
    rng: jax.Array | None = None,
) -> Callable[[Params], Any]:
    """``grad_fn(params)``: the gradient part of :func:`accumulated_value_and_grad_fn`."""
    value_and_grad_fn = accumulated_value_and_grad_fn(
        loss_fn, model_state, batch, num_micro_steps, axis_name=axis_name, rng=rng
    )
    return lambda params: value_and_grad_fn(params)[1]


def _mean_micro_steps(tree: Any) -> Any:
    """Mean over the leading (micro-step or micro-batch) axis of floating leaves; the last value
    of others."""

    def mean(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.mean(x.astype(jnp.float32), axis=0).astype(x.dtype)
        return x[-1]

    return jax.tree.map(mean, tree)


def _clean_pass(
    loss_fn: LossFn,
    params: Params,
    model_state: ModelState,
    batch: Batch,
    num_micro_steps: int,
    axis_name: str | None,
    rng: jax.Array | None = None,
) -> tuple[Any, jax.Array, ModelState, Metrics]:
    """Loss, clean gradient, new model state and metrics, averaged over the micro-steps."""
    params = to_varying(params, axis_name)
    if num_micro_steps == 1:
        value_and_grad = jax.value_and_grad(_loss_at(loss_fn, rng), has_aux=True)
        (loss, (new_model_state, metrics)), grads = value_and_grad(params, model_state, batch)
        return grads, loss, new_model_state, metrics

    def body(acc, inputs):
        micro_batch, key = inputs
        value_and_grad = jax.value_and_grad(_loss_at(loss_fn, key), has_aux=True)
        (loss, (new_model_state, metrics)), g = value_and_grad(params, model_state, micro_batch)
        return _accumulate(acc, g), (loss, new_model_state, metrics)

    acc, outputs = jax.lax.scan(
        body,
        _zeros_f32(params, axis_name),
        (split_micro_steps(batch, num_micro_steps), _micro_keys(rng, num_micro_steps)),
    )
    loss, new_model_state, metrics = _mean_micro_steps(outputs)
    return _finish_mean(acc, params, num_micro_steps), loss, new_model_state, metrics


def _pmean_floating(tree: Any, axis_name: str) -> Any:
    """pmean of the floating leaves over ``axis_name``; other leaves are left as they are."""

    def mean(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jax.lax.pmean(x, axis_name)
        return x

    return jax.tree.map(mean, tree)


# --------------------------------------------------------------------------------------
# Disturbances (gradient noise, parameter noise, parameter bias).
# --------------------------------------------------------------------------------------


class Disturbances(NamedTuple):
    """Scales of the disturbances of one step; traced, so a sweep over them compiles once.

    Attributes:
      grad_noise_std: std of Gaussian noise added to every gradient evaluation (the clean
        gradient and the second gradient each get their own draw).
      param_noise_std: std of Gaussian noise added to the params after the step.
      param_bias: constant added to every param after the step.
    """

    grad_noise_std: Any = 0.0
    param_noise_std: Any = 0.0
    param_bias: Any = 0.0


def add_normal(tree: Any, key: jax.Array, std: Any) -> Any:
    """``tree + std · N(0, 1)``, independent per element, in each leaf's dtype.

    One draw for the whole tree (then split into leaves): XLA compiles a random draw per call
    site, and one per leaf makes the step's compile time grow with the number of leaves.
    """
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
    noise = jnp.asarray(std, jnp.float32) * jax.random.normal(key, (sum(sizes),), jnp.float32)
    parts = jnp.split(noise, np.cumsum(sizes)[:-1])
    noisy = [(x + n.reshape(x.shape)).astype(x.dtype) for x, n in zip(leaves, parts, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def _maybe_add_normal(tree: Any, key: jax.Array, std: Any) -> Any:
    """:func:`add_normal` when ``std > 0`` (a runtime branch: no draw at all when it is 0)."""
    std = jnp.asarray(std, jnp.float32)
    # lax.cond, not a Python `if`: std is traced, so one program serves every noise level, and
    # the draw (a full parameter-sized vector) is skipped at run time when std == 0. Under a
    # vmap over micro-batches the predicate is unbatched, so it stays a real branch.
    return jax.lax.cond(std > 0, lambda t: add_normal(t, key, std), lambda t: t, tree)


# --------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------


class CleanPass(NamedTuple):
    """The clean half of a step: the gradient ``tx.update`` gets (noise added; stacked over
    the micro-batches for m > 1), the loss, the new model state and the metrics."""

    grads: Any
    loss: jax.Array
    model_state: ModelState
    metrics: Metrics


class SplitTrainStep(NamedTuple):
    """:func:`make_train_step` in two halves (``split=True``).

    ``clean(state, batch, key=None, disturbances=None) -> CleanPass`` and
    ``update(state, batch, clean, key=None, disturbances=None, *, second_gradient=None) ->
    (state, metrics)``; ``update(state, batch, clean(state, batch, key, d), key, d)`` is the
    whole step (the batch is augmented in each half with the same key).
    """

    clean: Callable[..., CleanPass]
    update: Callable[..., tuple[TrainState, Metrics]]


class _StepInputs(NamedTuple):
    batch: Batch  # augmented; split into micro-batches (leading axis m) for m > 1
    rngs: jax.Array | None  # dropout key(s), one per micro-batch for m > 1
    k_noise1: jax.Array | None
    k_noise2: jax.Array | None
    k_param: jax.Array | None


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformationExtraArgs,
    *,
    axis_name: str | None = None,
    num_micro_steps: int = 1,
    num_microbatches: int = 1,
    augment: Callable[[jax.Array, Batch], Batch] | None = None,
    loss_takes_rng: bool = False,
    second_gradient: bool | None = None,
    split: bool = False,
) -> Callable[..., tuple[TrainState, Metrics]] | SplitTrainStep:
    """THE sharpness-aware step ``step(state, batch, key=None, disturbances=None)``, unmapped.

    Every training path of sharpjax runs this function: ``jax.jit`` of it on a mesh with a
    sharded batch (GSPMD; the trainer, :func:`make_sharded_train_step`), under ``jax.pmap``
    (:func:`make_pmap_train_step`) or ``jax.shard_map`` (:func:`make_shard_map_train_step`)
    with ``axis_name``. As data flows::

        batch ─► [augment(k_aug, batch)]
              ─► clean pass: value_and_grad(loss_fn)(w, model_state, batch) → loss, g, stats
                 (k micro-steps accumulated; m micro-batches vmapped → g stacked (m, ...))
              ─► g [+ σ_g N(0, 1)]
              ─► tx.update(g, opt_state, w, grad_fn=...)   grad_fn at fixed model_state
              ─► w + updates [+ σ_w N(0, 1)] [+ b]
              ─► model_state ← the clean pass's (mean over micro-steps, micro-batches, devices)

    Args:
      loss_fn: ``loss_fn(params, model_state, batch) -> (loss, (new_model_state, metrics))``,
        see :data:`LossFn`; with ``loss_takes_rng`` it also takes a keyword ``rng`` (its dropout
        key; the second pass gets the same key as the clean pass).
      tx: an optax transformation whose sharpjax part takes ``grad_fn`` (e.g.
        ``optax.chain(sharpjax.sam(0.05, axis_name=...), optax.sgd(0.1, momentum=0.9))``),
        built with the same ``axis_name`` as the step.
      axis_name: the data-parallel axis when mapped with pmap/shard_map; None on one device and
        under GSPMD (a sharded batch under plain ``jax.jit``).
      num_micro_steps: gradient accumulation, k micro-steps per (device's) batch (module
        docstring); ε is computed once from the accumulated gradient.
      num_microbatches: m > 1 for m-sharpness: the batch is split into m contiguous
        micro-batches, the clean pass is vmapped over them, ``updates`` are the m stacked
        gradients and ``grad_fn(params, j)`` is the gradient on micro-batch j (the contract of
        ``sharpjax.msam`` and of every transformation built with ``num_microbatches=m``). With
        BatchNorm each micro-batch is normalised with its own statistics (as on m devices) and
        the new statistics are their mean.
      augment: ``augment(key, batch) -> batch``, e.g. crop and flip of the inputs; applied to
        the (device's) batch with the step's augmentation key.
      loss_takes_rng: pass ``rng=`` to ``loss_fn`` (needs ``key``).
      second_gradient: None (the policy of an efficient variant decides in the step, under
        ``lax.cond``), or the decision taken before the step, passed on to ``tx.update``: a
        step built with True takes the second gradient, one built with False skips it
        (``sharpjax.efficient.planned_step`` picks between the two on the host).
      split: return the step in its two halves, a :class:`SplitTrainStep`, for a policy that
        decides from this step's clean gradient (AE-SAM) on a backend where ``lax.cond`` is
        slow: run ``clean``, read the decision with
        ``sharpjax.efficient.plan_second_gradient(opt_state, clean.grads)``, then
        ``update(..., second_gradient=...)`` (each half jitted on its own; the trainer does
        this on CPU).

    Returns:
      ``step(state, batch, key=None, disturbances=None) -> (state, metrics)``. ``key`` (a JAX
      key, traced) is split into the keys of augmentation, dropout, the two gradient noises and
      the parameter noise; it is needed when any of those is used. ``disturbances`` is a
      :class:`Disturbances` of traced scales (None: none). Under ``axis_name``, augmentation and
      dropout fold in the device index (each device's examples get their own draws), the
      noises do not (each noise is added to the device-averaged gradient once). ``metrics``
      holds ``loss``, the metrics of ``loss_fn`` and the optimizer's diagnostics
      (``sharpjax.diagnostics``), averaged over micro-steps, micro-batches and devices.
    """
    _check_num_micro_steps(num_micro_steps)
    _check_count("num_microbatches", num_microbatches)
    if split and second_gradient is not None:
        raise ValueError(
            "With split=True the decision goes to the update half, per call: "
            "update(state, batch, clean, key, disturbances, second_gradient=...)."
        )
    spec = _StepSpec(
        loss_fn, tx, axis_name, num_micro_steps, num_microbatches, augment, loss_takes_rng
    )

    def step(
        state: TrainState,
        batch: Batch,
        key: jax.Array | None = None,
        disturbances: Disturbances | None = None,
    ) -> tuple[TrainState, Metrics]:
        inputs = step_inputs(spec, batch, key, disturbances)
        clean = clean_pass(spec, state, inputs, disturbances)
        return update_pass(spec, state, inputs, clean, disturbances, second_gradient)

    if not split:
        return step

    def clean_step(
        state: TrainState,
        batch: Batch,
        key: jax.Array | None = None,
        disturbances: Disturbances | None = None,
    ) -> CleanPass:
        return clean_pass(spec, state, step_inputs(spec, batch, key, disturbances), disturbances)

    def update_step(
        state: TrainState,
        batch: Batch,
        clean: CleanPass,
        key: jax.Array | None = None,
        disturbances: Disturbances | None = None,
        *,
        second_gradient: bool | None = None,
    ) -> tuple[TrainState, Metrics]:
        inputs = step_inputs(spec, batch, key, disturbances)
        return update_pass(spec, state, inputs, clean, disturbances, second_gradient)

    return SplitTrainStep(clean_step, update_step)


# The step's pieces, in the order they run; each a function of the step's spec and its values.


class _StepSpec(NamedTuple):
    """What :func:`make_train_step` was built with (the static part of the step)."""

    loss_fn: LossFn
    tx: optax.GradientTransformationExtraArgs
    axis_name: str | None
    num_micro_steps: int
    num_microbatches: int
    augment: Callable[[jax.Array, Batch], Batch] | None
    loss_takes_rng: bool


def step_inputs(
    spec: _StepSpec, batch: Batch, key: jax.Array | None, disturbances: Disturbances | None
) -> _StepInputs:
    """The step's keys, the augmented batch and the dropout keys (split into micro-batches)."""
    needs_key = spec.augment is not None or spec.loss_takes_rng or disturbances is not None
    if key is None and needs_key:
        raise ValueError(
            "This step uses randomness (augment, loss_takes_rng or disturbances): call it "
            "as step(state, batch, key), with a JAX key (e.g. fold_in(root, step_count))."
        )
    if key is None:
        k_aug = k_drop = k_noise1 = k_noise2 = k_param = None
    else:
        k_aug, k_drop, k_noise1, k_noise2, k_param = jax.random.split(key, 5)
        if spec.axis_name is not None:  # each device's examples get their own draws
            index = jax.lax.axis_index(spec.axis_name)
            k_aug, k_drop = jax.random.fold_in(k_aug, index), jax.random.fold_in(k_drop, index)
    if spec.augment is not None:
        batch = spec.augment(k_aug, batch)
    rngs = k_drop if spec.loss_takes_rng else None
    if spec.num_microbatches > 1:
        batch = split_microbatches(batch, spec.num_microbatches)
        rngs = None if rngs is None else jax.random.split(rngs, spec.num_microbatches)
    return _StepInputs(batch, rngs, k_noise1, k_noise2, k_param)


def _gradient_noise(tree: Any, key: jax.Array | None, disturbances: Disturbances | None) -> Any:
    if disturbances is None:
        return tree
    return _maybe_add_normal(tree, key, disturbances.grad_noise_std)


def clean_pass(
    spec: _StepSpec, state: TrainState, inputs: _StepInputs, disturbances: Disturbances | None
) -> CleanPass:
    """Loss, gradient (noisy; stacked over the m micro-batches), new model state, metrics."""
    params, model_state, _ = state

    def one(batch, rng):
        return _clean_pass(
            spec.loss_fn, params, model_state, batch, spec.num_micro_steps, spec.axis_name, rng
        )

    if spec.num_microbatches == 1:
        grads, loss, new_model_state, metrics = one(inputs.batch, inputs.rngs)
    else:
        grads, losses, stats, metrics = jax.vmap(one)(inputs.batch, inputs.rngs)
        loss = jnp.mean(losses)
        new_model_state, metrics = _mean_micro_steps(stats), _mean_micro_steps(metrics)
    grads = _gradient_noise(grads, inputs.k_noise1, disturbances)
    return CleanPass(grads, loss, new_model_state, metrics)


def second_pass_fn(
    spec: _StepSpec,
    model_state: ModelState,
    inputs: _StepInputs,
    disturbances: Disturbances | None,
) -> Callable[..., tuple[jax.Array, Any]]:
    """``value_and_grad_fn(p, j=None)`` for ``tx.update``: loss and (noisy) gradient at ``p`` on
    the batch, or on micro-batch ``j``, at the fixed model state."""

    def value_and_grad_fn(p, j=None):
        batch, rng, k = inputs.batch, inputs.rngs, inputs.k_noise2
        if j is not None:  # micro-batch j of m
            batch = jax.tree.map(lambda a: a[j], batch)
            rng = None if rng is None else rng[j]
            k = None if k is None else jax.random.fold_in(k, j)
        loss2, g2 = accumulated_value_and_grad_fn(
            spec.loss_fn,
            model_state,
            batch,
            spec.num_micro_steps,
            axis_name=spec.axis_name,
            rng=rng,
        )(p)
        return loss2, _gradient_noise(g2, k, disturbances)

    return value_and_grad_fn


def disturb_params(params: Params, inputs: _StepInputs, disturbances: Disturbances | None) -> Any:
    """``w [+ σ_w N(0, 1)] [+ b]`` after the step (noise-resistant SAM's disturbances)."""
    if disturbances is None:
        return params
    params = _maybe_add_normal(params, inputs.k_param, disturbances.param_noise_std)
    bias = jnp.asarray(disturbances.param_bias, jnp.float32)
    return jax.tree.map(lambda w: (w + bias).astype(w.dtype), params)


def step_metrics(
    spec: _StepSpec, clean: CleanPass, opt_state: optax.OptState
) -> tuple[ModelState, Metrics]:
    """The new model state and the metrics: loss, ``loss_fn``'s metrics and the optimizer's
    diagnostics, as float32 device means."""
    from sharpjax.core import diagnostics as read_diagnostics

    metrics = {"loss": clean.loss, **clean.metrics}
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    new_model_state = clean.model_state
    if spec.axis_name is not None:
        new_model_state = _pmean_floating(new_model_state, spec.axis_name)
        metrics = jax.lax.pmean(metrics, spec.axis_name)
    # The core's diagnostics are already device means (it averages them over axis_name).
    diag = {k: jnp.asarray(v, jnp.float32) for k, v in read_diagnostics(opt_state).items()}
    return new_model_state, {**diag, **metrics}


def update_pass(
    spec: _StepSpec,
    state: TrainState,
    inputs: _StepInputs,
    clean: CleanPass,
    disturbances: Disturbances | None,
    decision: bool | None,
) -> tuple[TrainState, Metrics]:
    """``tx.update`` (ε and the second pass inside it), ``w + updates``, the disturbances and
    the metrics."""
    params, model_state, opt_state = state
    # The clean loss rides along so that the diagnostics carry loss, perturbed_loss and
    # sharpness; the base optimizers of the chain ignore both extra arguments.
    planned = {} if decision is None else {"second_gradient": decision}
    updates, opt_state = spec.tx.update(
        clean.grads,
        opt_state,
        params,
        value_and_grad_fn=second_pass_fn(spec, model_state, inputs, disturbances),
        loss=clean.loss,
        **planned,
    )
    params = disturb_params(optax.apply_updates(params, updates), inputs, disturbances)
    new_model_state, metrics = step_metrics(spec, clean, opt_state)
    return TrainState(params, new_model_state, opt_state), metrics


# --------------------------------------------------------------------------------------
# jax.pmap.
# --------------------------------------------------------------------------------------


def replicate(
    tree: Any, axis_name: str = "batch", devices: Sequence[jax.Device] | None = None
) -> Any:
    """Copies every leaf onto each device, with a leading device axis, for ``jax.pmap``.

    Pass the pmap's ``axis_name``: the arrays then carry the sharding that the pmapped step
    returns, so the second step does not compile again.
    """
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.array(devices), (axis_name,)), P(axis_name))

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x, (len(devices), *x.shape)), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a pmapped (replicated) pytree."""
    return jax.tree.map(lambda x: x[0], tree)


def shard_for_pmap(batch: Batch, num_devices: int | None = None) -> Batch:
    """Reshapes a batch from ``(B, ...)`` to ``(devices, B/devices, ...)`` (contiguous shards)."""
    num_devices = num_devices or jax.local_device_count()

    def shard(x):
        if x.shape[0] % num_devices:
            raise ValueError(
                f"The batch size {x.shape[0]} does not split over {num_devices} devices."
            )
        return x.reshape((num_devices, x.shape[0] // num_devices, *x.shape[1:]))

    return jax.tree.map(shard, batch)


def make_pmap_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformationExtraArgs,
    axis_name: str = "batch",
    *,
    num_micro_steps: int = 1,
    donate: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The data-parallel step under ``jax.pmap(axis_name=axis_name)``.

    Example::

        from sharpjax import parallel

        tx = optax.chain(sharpjax.sam(0.05, axis_name="batch"), optax.sgd(0.1, momentum=0.9))
        step = parallel.make_pmap_train_step(loss_fn, tx, "batch")
        state = parallel.TrainState(params, batch_stats, tx.init(params))
        state = parallel.replicate(state, "batch")
        state, metrics = step(state, parallel.shard_for_pmap(batch))

    ``tx`` must be built with ``axis_name``: pmap cannot check it (the shard_map step does),
    and without it each device would step with its own gradient and the replicas diverge.

    Args: as :func:`make_train_step`, plus ``donate`` (donate the input state's buffers; off
    by default because with jax 0.10's pmap the compiled step then copies every donated buffer
    in and out, which costs more than it saves; the shard_map step has no such copies) and
    ``devices`` (default: the local devices).

    Returns:
      ``step(state, batch)``: ``state`` replicated (:func:`replicate`), ``batch`` with a leading
      device axis (:func:`shard_for_pmap`); outputs are replicated the same way. Per-device
      optimizer state (VaSSO's ``d`` in per-device mode) simply differs between the copies.
    """
    step = make_train_step(loss_fn, tx, axis_name=axis_name, num_micro_steps=num_micro_steps)
    return jax.pmap(
        step, axis_name=axis_name, donate_argnums=(0,) if donate else (), devices=devices
    )


# --------------------------------------------------------------------------------------
# jax.shard_map over a mesh (one host or several).
# --------------------------------------------------------------------------------------


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


class ShardMapTrainStep:
    """A jitted ``shard_map`` sharpness-aware step over one axis of a mesh.

    Build it with :func:`make_shard_map_train_step`. Layout of the global arrays:

    * ``batch``: every leaf sharded along its leading axis over ``axis_name``
      (:meth:`shard_batch` builds it from each process's part).
    * ``params``, ``model_state``: replicated (``PartitionSpec()``).
    * ``opt_state``: replicated, except the leaves that differ between devices (VaSSO's ``d``
      in per-device mode), which carry a leading axis of one entry per device, sharded over
      ``axis_name``. :meth:`opt_state_specs` tells which; :meth:`init` builds the state.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        tx: optax.GradientTransformationExtraArgs,
        mesh: Mesh,
        axis_name: str = "batch",
        num_micro_steps: int = 1,
        donate: bool = True,
    ):
        if axis_name not in mesh.axis_names:
            raise ValueError(
                f"axis_name={axis_name!r} is not an axis of the mesh, whose axes are "
                f"{mesh.axis_names}."
            )
        _check_num_micro_steps(num_micro_steps)
        self.loss_fn, self.tx, self.mesh, self.axis_name = loss_fn, tx, mesh, axis_name
        self.num_micro_steps, self.donate = num_micro_steps, donate
        self._layouts: dict[Any, tuple[bool, ...]] = {}
        self._compiled: dict[tuple[bool, ...], Callable] = {}

    @property
    def num_devices(self) -> int:
        return self.mesh.shape[self.axis_name]

    # ---- layout of the optimizer state ----

    def per_device_leaves(self, params: Params) -> tuple[bool, ...]:
        """For each leaf of ``tx.init(params)``: whether it differs between devices."""
        leaves, treedef = jax.tree.flatten(params)
        key = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
        if key not in self._layouts:
            abstract = _abstract(params)
            self._layouts[key] = _per_device_leaves(self.tx, self.mesh, self.axis_name, abstract)
        return self._layouts[key]

    def opt_state_specs(self, params: Params) -> Any:
        """PartitionSpecs of the optimizer state: ``P(axis_name)`` for per-device leaves."""
        shapes = jax.eval_shape(self.tx.init, _abstract(params))
        return _specs(shapes, self.per_device_leaves(params), self.axis_name)

    def state_specs(self, params: Params) -> TrainState:
        """PartitionSpecs of the whole :class:`TrainState`."""
        return TrainState(P(), P(), self.opt_state_specs(params))

    # ---- building global arrays ----

    def _global(self, x: Any, per_device: bool) -> jax.Array:
        x = np.asarray(x)
        if per_device:
            spec = P(self.axis_name)
            x = np.broadcast_to(x[None], (self.num_devices, *x.shape))
        else:
            spec = P()
        return jax.make_array_from_callback(
            x.shape, NamedSharding(self.mesh, spec), lambda index: x[index]
        )

    def init(self, params: Params, model_state: ModelState = None) -> TrainState:
        """The global train state: ``tx.init(params)`` laid out as :meth:`opt_state_specs` says.

        On several hosts every process must pass the same ``params`` and ``model_state``
        (e.g. initialised from the same seed).
        """
        opt_state = self.tx.init(params)
        flags = self.per_device_leaves(params)
        leaves, treedef = jax.tree.flatten(opt_state)
        opt_state = jax.tree.unflatten(
            treedef, [self._global(x, f) for x, f in zip(leaves, flags, strict=True)]
        )
        return TrainState(
            jax.tree.map(lambda x: self._global(x, False), params),
            jax.tree.map(lambda x: self._global(x, False), model_state),
            opt_state,
        )

    def shard_batch(self, local_batch: Batch) -> Batch:
        """The global batch from this process's part (the whole batch on one host).

        With ``n`` processes, process ``i`` passes rows ``[i B/n, (i + 1) B/n)`` of the global
        batch of ``B`` examples; the rows land on the devices in mesh order.
        """
        sharding = NamedSharding(self.mesh, P(self.axis_name))
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
            local_batch,
        )

    # ---- the step ----

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        for x in jax.tree.leaves(batch):
            if x.shape[0] % (self.num_devices * self.num_micro_steps):
                raise ValueError(
                    f"The global batch size {x.shape[0]} must be a multiple of devices × "
                    f"num_micro_steps = {self.num_devices} × {self.num_micro_steps}."
                )
        per_device = self.per_device_leaves(state.params)
        if per_device not in self._compiled:
            self._compiled[per_device] = self._build(per_device)
        return self._compiled[per_device](state, batch)

    def _build(self, per_device: tuple[bool, ...]) -> Callable:
        step = make_train_step(
            self.loss_fn, self.tx, axis_name=self.axis_name, num_micro_steps=self.num_micro_steps
        )

        def body(state: TrainState, batch: Batch):
            opt_state = _unstack(state.opt_state, per_device)
            new_state, metrics = step(state._replace(opt_state=opt_state), batch)
            return new_state._replace(opt_state=_stack(new_state.opt_state, per_device)), metrics

        def run(state: TrainState, batch: Batch):
            specs = TrainState(P(), P(), _specs(state.opt_state, per_device, self.axis_name))
            mapped = jax.shard_map(
                body, mesh=self.mesh, in_specs=(specs, P(self.axis_name)), out_specs=(specs, P())
            )
            return mapped(state, batch)

        return jax.jit(run, donate_argnums=(0,) if self.donate else ())


def _specs(tree: Any, per_device: tuple[bool, ...], axis_name: str) -> Any:
    specs = [P(axis_name) if f else P() for f in per_device]
    return jax.tree.unflatten(jax.tree.structure(tree), specs)


def _unstack(tree: Any, per_device: tuple[bool, ...]) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [x[0] if f else x for x, f in zip(leaves, per_device, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def _stack(tree: Any, per_device: tuple[bool, ...]) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [x[None] if f else x for x, f in zip(leaves, per_device, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def _per_device_leaves(
    tx: optax.GradientTransformationExtraArgs, mesh: Mesh, axis_name: str, abstract_params: Any
) -> tuple[bool, ...]:
    """Which optimizer-state leaves differ between devices, found by tracing ``tx.update``.

    Traces the update under ``shard_map`` with device-varying gradients (as the step has them)
    and reads shard_map's type of each new state leaf; a leaf fed back as device-varying may
    make others vary, so it iterates to the fixed point. Also checks that the updates are the
    same on every device, i.e. that ``tx`` averages over ``axis_name``.
    """
    state_shapes = jax.eval_shape(tx.init, abstract_params)
    leaves, treedef = jax.tree.flatten(state_shapes)
    n = mesh.shape[axis_name]
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis_name))
    global_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_params
    )
    per_device = (False,) * len(leaves)
    for _ in range(len(leaves) + 1):
        found: dict[str, list[bool]] = {}

        def probe(params, opt_state, per_device=per_device, found=found):
            opt_state = _unstack(opt_state, per_device)
            grads = to_varying(params, axis_name)
            grad_fn = lambda p: to_varying(p, axis_name)
            updates, new_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
            found["state"] = [axis_name in _varying_axes(x) for x in jax.tree.leaves(new_state)]
            found["updates"] = [axis_name in _varying_axes(x) for x in jax.tree.leaves(updates)]
            return jax.tree.map(lambda x: x[None], new_state)

        global_state = jax.tree.unflatten(
            treedef,
            [
                jax.ShapeDtypeStruct((n, *x.shape), x.dtype, sharding=sharded)
                if f
                else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
                for x, f in zip(leaves, per_device, strict=True)
            ],
        )
        jax.eval_shape(
            jax.shard_map(
                probe,
                mesh=mesh,
                in_specs=(P(), _specs(state_shapes, per_device, axis_name)),
                out_specs=P(axis_name),
            ),
            global_params,
            global_state,
        )
        if any(found["updates"]):
            raise ValueError(
                f"tx's updates differ between the devices of axis {axis_name!r}, so the "
                "replicated params would diverge. Build the sharpjax transformation with the "
                f"step's axis: e.g. sharpjax.sam(rho, axis_name={axis_name!r})."
            )
        new = tuple(a or b for a, b in zip(per_device, found["state"], strict=True))
        if new == per_device:
            return per_device
        per_device = new
    return per_device


def make_shard_map_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformationExtraArgs,
    mesh: Mesh,
    axis_name: str = "batch",
    *,
    num_micro_steps: int = 1,
    donate: bool = True,
) -> ShardMapTrainStep:
    """The data-parallel step as ``jax.jit(jax.shard_map(...))`` over ``mesh``'s ``axis_name``.

    Works unchanged on one host and on several (after ``jax.distributed.initialize``, with a
    mesh over ``jax.devices()``, the global devices). Example::

        mesh = jax.sharding.Mesh(jax.devices(), ("batch",))
        tx = optax.chain(sharpjax.sam(0.05, axis_name="batch"), optax.sgd(0.1, momentum=0.9))
        step = sharpjax.parallel.make_shard_map_train_step(loss_fn, tx, mesh, "batch")
        state = step.init(params, batch_stats)
        for local_batch in data:                 # this process's part of the global batch
            state, metrics = step(state, step.shard_batch(local_batch))

    Args: as :func:`make_train_step`, plus the mesh and ``donate`` (donate the input state).

    Returns:
      A :class:`ShardMapTrainStep`: call it as ``step(state, batch) -> (state, metrics)``;
      ``metrics`` (device means) are replicated. The parameters are identical on every device
      after each step, because ``tx`` averages the final gradient; the call checks (at trace
      time) that ``tx`` does, through shard_map's replication types.
    """
    return ShardMapTrainStep(loss_fn, tx, mesh, axis_name, num_micro_steps, donate)


# --------------------------------------------------------------------------------------
# GSPMD: plain jax.jit over a mesh with named axes (the trainer's path).
# --------------------------------------------------------------------------------------

DATA, FSDP, MODEL = "data", "fsdp", "model"
MESH_AXES = (DATA, FSDP, MODEL)
"""The axes of :func:`make_train_mesh`: ``data`` (replicas, each a whole copy of what the other
axes split), ``fsdp`` (params, optimizer and rule state split ZeRO-3 style), ``model`` (tensor
parallel, from flax logical partitioning annotations). The batch is split over every axis but
``model``."""


def _mesh_devices(num_devices: int | None) -> list:
    """The first ``num_devices`` of ``jax.devices()`` (every host's), checked."""
    available = jax.devices()
    if num_devices is None:
        num_devices = len(available)
    if not isinstance(num_devices, int) or not 1 <= num_devices <= len(available):
        raise ValueError(
            f"num_devices={num_devices!r} must be an int in [1, {len(available)}] (the devices "
            f"JAX sees: {len(available)}); use num_devices=None for all of them."
        )
    if jax.process_count() > 1 and num_devices != len(available):
        raise ValueError(
            f"num_devices={num_devices} on {jax.process_count()} processes: a multi-host run "
            f"uses every device ({len(available)}); leave num_devices=None."
        )
    return available[:num_devices]


def make_mesh(num_devices: int | None = None, axis_name: str = "batch") -> Mesh:
    """A 1-D mesh over the first ``num_devices`` of ``jax.devices()`` (default: all of them).

    After ``jax.distributed.initialize``, ``jax.devices()`` lists every host's devices, each
    host's consecutive, so the mesh spans every host. For a mesh with ``fsdp``/``model`` axes
    see :func:`make_train_mesh`.
    """
    return Mesh(np.array(_mesh_devices(num_devices)), (axis_name,))


def parse_mesh(spec: str | Mapping[str, int] | None, num_devices: int | None) -> dict[str, int]:
    """The sizes of :data:`MESH_AXES` from ``"data=2,fsdp=4"`` (or a dict), for ``num_devices``.

    Axes not named have size 1; ``None`` or ``""`` puts every device on ``data`` (data
    parallelism, params replicated). The product of the sizes must be ``num_devices`` (not
    checked when it is None: the device count is not known yet).

    Raises:
      ValueError: naming ``mesh`` and the fix, for a malformed entry, an unknown axis, a size
        below 1 or a product that is not the device count.
    """
    if spec is None or spec == "":
        if num_devices is None:
            raise ValueError("parse_mesh(None, None): give the mesh or the device count.")
        return {DATA: num_devices, FSDP: 1, MODEL: 1}
    axes_help = "data (replicas), fsdp (parameters sharded) and model (tensor parallel)"
    if isinstance(spec, str):
        sizes: dict[str, Any] = {}
        for part in spec.split(","):
            name, sep, value = (t.strip() for t in part.partition("="))
            if not sep or not value.isdigit():
                raise ValueError(
                    f"mesh={spec!r}: {part.strip()!r} is not axis=size. Write e.g. "
                    f"mesh='data=2,fsdp=4'; the axes are {axes_help}."
                )
            if name in sizes:
                raise ValueError(f"mesh={spec!r} names axis {name!r} twice: name each once.")
            sizes[name] = int(value)
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(
            f"mesh={spec!r} names unknown axis {', '.join(map(repr, unknown))}: the axes are "
            f"{axes_help}."
        )
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh={spec!r}: the size of axis {name!r} must be an int >= 1.")
    shape = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    product = math.prod(shape.values())
    if num_devices is not None and product != num_devices:
        others = shape[FSDP] * shape[MODEL]
        hint = (
            f" (e.g. data={num_devices // others}, keeping fsdp={shape[FSDP]}, "
            f"model={shape[MODEL]})"
            if num_devices % others == 0
            else ""
        )
        raise ValueError(
            f"mesh={spec!r} spans data × fsdp × model = {shape[DATA]} × {shape[FSDP]} × "
            f"{shape[MODEL]} = {product} devices, but the run has {num_devices}: make the "
            f"product {num_devices}{hint}, or set num_devices={product}."
        )
    return shape


def format_mesh(mesh: Mesh) -> str:
    """``"data=2,fsdp=4,model=1"``: the mesh's axes and sizes, as :func:`parse_mesh` reads them."""
    return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


def make_train_mesh(
    spec: str | Mapping[str, int] | None = None, num_devices: int | None = None
) -> Mesh:
    """The mesh ``data × fsdp × model`` (:data:`MESH_AXES`) over ``num_devices`` devices.

    ``spec`` as :func:`parse_mesh` reads it (``"data=2,fsdp=4"``; None: all on ``data``).
    Devices are laid out data-major, so a replica's ``fsdp × model`` devices are consecutive
    (on several hosts, ``fsdp`` spans hosts only when a host holds fewer devices than a
    replica).
    """
    devices = _mesh_devices(num_devices)
    shape = parse_mesh(spec, len(devices))
    grid = np.array(devices).reshape(tuple(shape[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes the batch is split over: every axis of ``mesh`` but ``model``."""
    return tuple(a for a in mesh.axis_names if a != MODEL)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch's sharding: its leading axis split over :func:`batch_axes`."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the global batch is split into (the product of :func:`batch_axes`)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def replica_size(mesh: Mesh) -> int:
    """Devices per replica: those of the axes that split the params (``fsdp × model``)."""
    return math.prod(size for name, size in mesh.shape.items() if name in (FSDP, MODEL))


def perturbation_microbatches(
    mode: str, num_devices: int, group_size: int | None, replica_devices: int = 1
) -> int:
    """How many perturbations a global batch gets under GSPMD: 1, the replicas, or the groups.

    ``"synced"``: one ε from the global-batch gradient (1 device's SAM); ``"per_device"``: one
    per replica's shard of the batch, i.e. per device when the params are replicated
    (m-sharpness with m = replicas = the mesh's ``data`` size); ``"grouped"``: one per group of
    ``group_size`` consecutive devices, a whole number of replicas. ``replica_devices``: the
    devices one replica spans (``fsdp × model``, :func:`replica_size`). The step then runs with
    ``num_microbatches`` = this.

    Raises:
      ValueError: before anything compiles, for a mode the mesh cannot express: per-device
        with a single replica spanning several devices (one ε per device would need every
        device to hold all params), or groups that split a replica.
    """
    if mode == "synced":
        return 1
    if mode not in ("per_device", "grouped"):
        raise ValueError(f"perturbation_mode={mode!r} is not 'per_device', 'synced' or 'grouped'.")
    if not isinstance(replica_devices, int) or replica_devices < 1 or num_devices % replica_devices:
        raise ValueError(
            f"replica_devices={replica_devices!r} must be a positive divisor of the "
            f"{num_devices} devices."
        )
    replicas = num_devices // replica_devices
    if mode == "per_device":
        if replicas == 1 and num_devices > 1:
            raise ValueError(
                f"perturbation_mode='per_device' takes one ε per replica along the mesh's "
                f"'data' axis, and this mesh has one replica spanning all {num_devices} devices "
                "(its parameters are split over them, so no device can perturb them alone): "
                "use perturbation_mode='synced', or put devices on 'data' (e.g. "
                "mesh='data=2,fsdp=...')."
            )
        return replicas
    choices = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    if replica_devices > 1:
        choices = [d for d in choices if d % replica_devices == 0]
    if not isinstance(group_size, int) or group_size not in choices:
        span = (
            f", and a multiple of the {replica_devices} devices of one replica (fsdp × model; "
            "a group cannot split a replica)"
            if replica_devices > 1
            else ""
        )
        raise ValueError(
            f"group_size={group_size!r} must be a positive divisor of the {num_devices} devices"
            f"{span} (perturbation_mode='grouped'): choose one of {choices}, or change the "
            "mesh."
        )
    return num_devices // group_size


def check_global_batch(
    batch_size: int,
    num_devices: int,
    num_micro_steps: int = 1,
    num_microbatches: int = 1,
    num_shards: int | None = None,
) -> None:
    """A clear error, before anything compiles, when the global batch does not split evenly.

    ``num_shards``: the pieces the batch is split into (:func:`batch_shards`; default: one per
    device, as on a 1-D mesh).
    """
    shards = num_devices if num_shards is None else num_shards
    if batch_size % shards:
        where = (
            f"the {num_devices} devices (num_devices={num_devices})"
            if shards == num_devices
            else f"the {shards} batch shards (the mesh's data × fsdp)"
        )
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of {where}: use a batch_size that is, "
            "or change the mesh / num_devices to divide batch_size."
        )
    per = num_microbatches * num_micro_steps
    if batch_size % per:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of num_microbatches × num_micro_steps "
            f"= {num_microbatches} × {num_micro_steps} (perturbation micro-batches, each "
            "accumulated over num_micro_steps): change batch_size or num_micro_steps."
        )


# ---- where each leaf of the state lives ----


def _leaf_name(path: Any) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _mesh_axes_of(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _param_spec(
    name: str, shape: tuple[int, ...], mesh: Any, mapped: tuple[Any, ...] | None
) -> tuple[P, list[str]]:
    """One leaf's spec: ``mapped`` (its logical annotation on the mesh's axes, or None), then
    ``fsdp`` on its largest free dimension that the fsdp size divides. Returns the spec and,
    for every split that was wanted but does not divide, why it is not made."""
    dims: list[Any] = list(mapped) if mapped is not None else []
    dims += [None] * (len(shape) - len(dims))
    unsplit: list[str] = []
    for i, entry in enumerate(dims):
        axes = _mesh_axes_of(entry)
        unknown = [a for a in axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"Parameter {name!r}: its partitioning maps dimension {i} to mesh axis "
                f"{unknown[0]!r}, which the mesh {dict(mesh.shape)} does not have: map the "
                f"logical axis to one of {mesh.axis_names} (or None) in the rules."
            )
        size = math.prod(mesh.shape[a] for a in axes)
        if size == 1:  # e.g. `mlp` → model on a mesh with model=1: the dimension is free
            dims[i] = None
        elif shape[i] % size:
            dims[i] = None
            unsplit.append(f"dim {i} ({shape[i]}) not divisible by {'×'.join(axes)}={size}")
    fsdp = mesh.shape.get(FSDP, 1)
    used = {a for entry in dims for a in _mesh_axes_of(entry)}
    if fsdp == 1 or FSDP in used:
        return P(*dims), unsplit
    free = [i for i in range(len(shape)) if dims[i] is None and shape[i] % fsdp == 0]
    if not free:
        return P(*dims), [*unsplit, f"not divisible by fsdp={fsdp} along any unsplit dimension"]
    # ZeRO-3: the largest dimension carries the split (the first one on a tie).
    dims[max(free, key=lambda i: (shape[i], -i))] = FSDP
    return P(*dims), unsplit


def plan_param_specs(
    params: Params,
    mesh: Any,
    *,
    logical_specs: Any = None,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> tuple[Any, list[tuple[Any, tuple[int, ...], list[str]]]]:
    """The one sharding plan of the params (:func:`param_shardings` documents it):
    ``(specs, unsplit)``, a mesh-axis ``PartitionSpec`` per leaf and, for each leaf not split
    as asked, ``(key path, shape, reasons)``. ``mesh``: a ``Mesh`` or ``AbstractMesh`` (only
    its axis names and sizes are read). :func:`sharpjax.models.partitioning.param_partition_specs`
    is this plan for flax's boxed trees."""
    import flax.linen as nn  # only for the logical annotations

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    mapped: list[Any] = [None] * len(leaves)
    if logical_specs is not None:
        specs = treedef.flatten_up_to(logical_specs)
        if rules is None and any(len(s) for s in specs):
            raise ValueError(
                "logical_specs are given without rules: pass rules=(('embed', 'fsdp'), "
                "('mlp', 'model'), ...), the flax logical-to-mesh axis pairs."
            )
        mapped = [tuple(nn.logical_to_mesh_axes(s, rules)) if len(s) else None for s in specs]
    elif mesh.shape.get(MODEL, 1) > 1:
        raise ValueError(
            f"The mesh has model={mesh.shape[MODEL]} but the model has no logical partitioning "
            "annotations (nn.with_logical_partitioning) to say which dimensions to split: use "
            "a model that has them, or put those devices on 'data' or 'fsdp'."
        )
    out, unsplit = [], []
    for (path, leaf), m in zip(leaves, mapped, strict=True):
        shape = tuple(jnp.shape(leaf))
        spec, reasons = _param_spec(_leaf_name(path), shape, mesh, m)
        if reasons:
            unsplit.append((path, shape, reasons))
        out.append(spec)
    return jax.tree.unflatten(treedef, out), unsplit


def param_shardings(
    params: Params,
    mesh: Mesh,
    *,
    logical_specs: Any = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    warn: bool = True,
) -> Any:
    """The ``NamedSharding`` of every parameter on ``mesh`` (ZeRO-3 / FSDP and tensor parallel).

    Each leaf is split over ``model`` (and any axis) where its flax logical annotation says
    (``logical_specs``: the tree of ``nn.get_partition_spec(variables)["params"]``, mapped to
    mesh axes by ``rules``, flax's ``(logical, mesh axis)`` pairs), then over ``fsdp`` along its
    largest remaining dimension that the fsdp size divides. A leaf with no such dimension is
    replicated over ``fsdp``, and a logical split that does not divide is dropped; these
    leaves are listed in one warning (``warn=True``). On a mesh without
    ``fsdp``/``model`` (or of size 1) every leaf is replicated: data parallelism. The plan
    itself is :func:`plan_param_specs`.

    ``params`` may be arrays or ``jax.ShapeDtypeStruct``; nothing is allocated.
    """
    specs, unsplit = plan_param_specs(params, mesh, logical_specs=logical_specs, rules=rules)
    if unsplit and warn:
        lines = [f"{_leaf_name(p)} {shape}: {', '.join(r)}" for p, shape, r in unsplit]
        warnings.warn(
            f"On mesh {format_mesh(mesh)}, {len(unsplit)} parameter(s) are not split as "
            f"asked, so they are replicated along those axes: {'; '.join(lines)}.",
            UserWarning,
            stacklevel=2,
        )
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


class _Placed:
    """A parameter's sharding and shape, as one (non-pytree) leaf for optax.tree_map_params."""

    def __init__(self, sharding: NamedSharding, shape: tuple[int, ...]):
        self.sharding, self.shape = sharding, shape


def _like_param(leaf: Any, placed: _Placed) -> NamedSharding:
    """A state leaf shaped like its parameter takes its sharding; one with extra leading axes
    (a rule's per-micro-batch state, ``(m, *shape)``) too, unsplit along those axes."""
    shape = tuple(jnp.shape(leaf))
    extra = len(shape) - len(placed.shape)
    if extra >= 0 and shape[extra:] == placed.shape:
        return NamedSharding(placed.sharding.mesh, P(*([None] * extra), *placed.sharding.spec))
    return NamedSharding(placed.sharding.mesh, P())


def opt_state_shardings(
    tx: optax.GradientTransformation, params: Params, shardings: Any, opt_state: Any = None
) -> Any:
    """The optimizer state's shardings: every copy of the params in it (momentum, Adam's
    moments, VaSSO's ``d``, LookSAM's ``g_v``, ...) sharded like the params, the rest (counts,
    diagnostics, keys) replicated.

    Found with ``optax.tree_utils.tree_map_params``, which initialises ``tx`` on a placeholder
    to tell the copies of the params from the other leaves. ``opt_state`` defaults to
    ``jax.eval_shape(tx.init, params)``.
    """
    mesh = jax.tree.leaves(shardings)[0].mesh
    replicated = NamedSharding(mesh, P())
    if opt_state is None:
        opt_state = jax.eval_shape(tx.init, params)
    placed = jax.tree.map(
        lambda s, p: _Placed(s, tuple(jnp.shape(p))),
        shardings,
        params,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return optax.tree_utils.tree_map_params(
        tx,
        _like_param,
        opt_state,
        placed,
        transform_non_params=lambda v: jax.tree.map(lambda _: replicated, v),
        is_leaf=lambda x: isinstance(x, _Placed),
    )


def state_shardings(
    tx: optax.GradientTransformation,
    params: Params,
    model_state: ModelState,
    mesh: Mesh,
    *,
    logical_specs: Any = None,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> TrainState:
    """Where a :class:`TrainState` lives on ``mesh``: params by :func:`param_shardings`, the
    optimizer and rule state by :func:`opt_state_shardings`, the model state (BatchNorm
    statistics: small) replicated."""
    params_sh = param_shardings(params, mesh, logical_specs=logical_specs, rules=rules)
    replicated = NamedSharding(mesh, P())
    return TrainState(
        params_sh,
        jax.tree.map(lambda _: replicated, model_state),
        opt_state_shardings(tx, params, params_sh),
    )


def put_global(tree: Any, shardings: Any) -> Any:
    """Every leaf of ``tree`` (host values, the same on every process) as a global array laid out
    as ``shardings`` says (a tree of shardings, or one for all), in fresh buffers.

    Leaves must convert to NumPy arrays; pass JAX keys as ``jax.random.key_data(key)``.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def shard_batch(
    mesh: Mesh, local_batch: Batch, axis_name: str | tuple[str, ...] | None = None
) -> Batch:
    """The global batch, its leading axis split over ``axis_name`` (default: every axis of
    ``mesh`` but ``model``, :func:`batch_axes`), from this process's rows.

    With ``n`` processes, process ``i`` passes rows ``[i B/n, (i + 1) B/n)`` of the global
    batch (the whole batch on one host). The transfer is asynchronous.
    """
    axes = batch_axes(mesh) if axis_name is None else axis_name
    sharding = NamedSharding(mesh, P(axes))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def replicate_on(mesh: Mesh, tree: Any) -> Any:
    """Every leaf replicated on every device of ``mesh`` (each process passes the same value).

    Leaves must convert to NumPy arrays; pass JAX keys as ``jax.random.key_data(key)``.
    """
    return put_global(tree, NamedSharding(mesh, P()))


def make_sharded_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformationExtraArgs,
    mesh: Mesh,
    axis_name: str | None = None,
    *,
    perturbation_mode: str = "synced",
    group_size: int | None = None,
    num_micro_steps: int = 1,
    augment: Callable[[jax.Array, Batch], Batch] | None = None,
    loss_takes_rng: bool = False,
    shardings: TrainState | None = None,
    donate: bool = True,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """:func:`make_train_step` under plain ``jax.jit`` on ``mesh`` (GSPMD).

    The batch is split over every axis but ``model`` (:func:`batch_axes`; ``axis_name``
    narrows it to one axis of a 1-D mesh). The state lives where ``shardings`` says
    (:func:`state_shardings`: params and optimizer state split over ``fsdp``/``model``;
    default: replicated, data parallelism); GSPMD inserts the gathers before each use of a
    split parameter and the reductions of the gradients, so the program is still the
    single-device program: synced mode on any mesh is one device's SAM on the global batch,
    its ``‖g‖²`` the sum of the shards' sums over the axes that hold distinct shards (each
    shard counted once, whatever the replication), BatchNorm over the global batch, the same
    random draws as on one device, the same code on one host or many.

    Per-device and grouped modes are m-sharpness with one micro-batch per replica (a replica is
    the ``fsdp × model`` devices of one ``data`` index) or per group of replicas
    (:func:`perturbation_microbatches`): the step splits the batch into that many contiguous
    micro-batches, whose leading axis lines up with ``data``, so the vmapped passes run on
    their own replicas. ``tx`` is therefore built *without* ``axis_name``, with
    ``num_microbatches`` = that count when it is > 1 and ``microbatch_execution="parallel"``
    (with ``"sequential"``, a ``lax.scan``, the program gathers every micro-batch onto every
    device and runs them one after another: correct, m times slower).

    Returns:
      ``step(state, batch, key=None, disturbances=None) -> (state, metrics)``, jitted; place
      ``state`` with :func:`put_global` (or :func:`replicate_on`) and ``batch`` with
      :func:`shard_batch`; the new state comes back laid out as ``shardings``, the metrics
      replicated. The input state is donated unless ``donate=False``.
    """
    if axis_name is not None and axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name={axis_name!r} is not an axis of the mesh, whose axes are {mesh.axis_names}."
        )
    if axis_name is None:
        num_devices, replica = mesh.devices.size, replica_size(mesh)
    else:
        num_devices, replica = mesh.shape[axis_name], 1
    num_microbatches = perturbation_microbatches(
        perturbation_mode, num_devices, group_size, replica
    )
    step = make_train_step(
        loss_fn,
        tx,
        num_micro_steps=num_micro_steps,
        num_microbatches=num_microbatches,
        augment=augment,
        loss_takes_rng=loss_takes_rng,
    )
    replicated = NamedSharding(mesh, P())
    state_out = replicated if shardings is None else shardings
    return jax.jit(
        step, out_shardings=(state_out, replicated), donate_argnums=(0,) if donate else ()
    )
