"""Streaming a measure over a dataset given as batches, in bounded memory.

Every measure is linear in the loss, or is built from quantities that are (HVPs, quadratic
forms, loss values and gradients). Over a dataset split into batches it is therefore the
example-weighted mean of the per-batch quantity; `DatasetLoss.accumulate` computes that mean,
one jitted call per batch, so only one batch is on the device at a time.
"""

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def batch_size(batch: PyTree) -> int:
    """Number of examples in a batch: the leading dimension of its first leaf."""
    leaves = jax.tree.leaves(batch)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError(
            "Each batch must be a pytree of arrays with a leading example axis "
            f"(e.g. a tuple (x, y)); got {type(batch).__name__}."
        )
    return int(jnp.shape(leaves[0])[0])


def _check_iterable(batches: Any, name: str) -> None:
    if isinstance(batches, str | bytes | Mapping) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{name} must be an iterable of batches (e.g. a list of (x, y) tuples), "
            f"got {type(batches).__name__}."
        )


class BatchLoss:
    """``params -> loss_fn(params, batch)``, keeping both parts for operators that need the data
    (the GGN and Fisher products read ``loss_fn.logits_fn`` and ``batch``)."""

    __slots__ = ("batch", "loss_fn")

    def __init__(self, loss_fn: Callable, batch: PyTree):
        self.loss_fn = loss_fn
        self.batch = batch

    def __call__(self, params: PyTree) -> jax.Array:
        return self.loss_fn(params, self.batch)


def _on_batch(fn: Callable, loss_fn: Callable, params: PyTree, batch: PyTree, *operands: Any):
    return fn(BatchLoss(loss_fn, batch), params, *operands)


# fn and loss_fn are static so that every batch (and every call with the same functions)
# reuses one compilation; fn must therefore be a module-level function, not a closure.
_on_batch_jit = jax.jit(_on_batch, static_argnums=(0, 1))


def hashable(f: Callable) -> bool:
    try:
        hash(f)
    except TypeError:
        return False
    return True


@jax.jit
def _scaled(tree: PyTree, c: Any) -> PyTree:
    return jax.tree.map(lambda t: c * t, tree)


@jax.jit
def _add_scaled(total: PyTree, tree: PyTree, c: Any) -> PyTree:
    return jax.tree.map(lambda t, x: t + c * x, total, tree)


def weighted_mean(results: Iterable[tuple[int, PyTree]], empty_message: str) -> PyTree:
    """``Σ_b n_b r_b / Σ_b n_b`` over ``(n_b, r_b)``; jitted per tree, not op by op per leaf."""
    total, count = None, 0
    for n, tree in results:
        # A float weight: an int would compile a second version of each helper.
        total = _scaled(tree, float(n)) if total is None else _add_scaled(total, tree, float(n))
        count += n
    if total is None:
        raise ValueError(empty_message)
    return _scaled(total, 1 / count)


class DatasetLoss:
    """The loss a measure differentiates.

    With ``batches=None`` it is ``loss_fn(params)``. Otherwise it is the example-weighted mean
    ``Σ_b n_b loss_fn(params, b) / Σ_b n_b`` over ``batches`` (``loss_fn`` must then be a mean
    over the batch's examples, and ``n_b`` is the leading dimension of the batch's first leaf).
    ``batches`` may be a one-shot iterator only for measures that read the data once.
    """

    def __init__(self, loss_fn: Callable, batches: Iterable | None = None, name: str = "batches"):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
        self.loss_fn = loss_fn
        self.batches = batches
        self.name = name
        self.streaming = batches is not None
        self._one_shot = False
        self._passes = 0
        if self.streaming:
            _check_iterable(batches, name)
            self._one_shot = iter(batches) is batches

    def accumulate(self, fn: Callable, params: PyTree, *operands: Any) -> PyTree:
        """``fn(loss, params, *operands)`` over the whole dataset (``fn`` linear in ``loss``)."""
        if not self.streaming:
            return fn(self.loss_fn, params, *operands)
        if self._one_shot and self._passes:
            raise TypeError(
                f"{self.name} is a one-shot iterator, but this measure reads the data several "
                "times; pass a list of batches or a re-iterable data loader."
            )
        self._passes += 1
        # An unhashable loss_fn cannot key a jit cache; it then runs op by op.
        on_batch = _on_batch_jit if hashable(self.loss_fn) else _on_batch
        results = (
            (batch_size(b), on_batch(fn, self.loss_fn, params, b, *operands)) for b in self.batches
        )
        return weighted_mean(results, f"{self.name} is empty; pass at least one batch.")

    def fori_loop(self, n: int, body: Callable, init: Any) -> Any:
        """``lax.fori_loop``, or a Python loop when every step has to stream the batches."""
        if self.streaming:
            for i in range(n):
                init = body(i, init)
            return init
        return jax.lax.fori_loop(0, n, body, init)


# impl, loss_fn and the static arguments key the compilation cache, so repeated calls with the
# same loss function (e.g. over training checkpoints) compile once.
@partial(jax.jit, static_argnums=(0, 1, 2))
def _whole(impl: Callable, loss_fn: Callable, static: tuple, *args: Any):
    return impl(DatasetLoss(loss_fn), *args, **dict(static))


def evaluate(impl: Callable, loss_fn: Callable, batches: Iterable | None, *args: Any, **static):
    """``impl(loss, *args, **static)`` with ``loss = DatasetLoss(loss_fn, batches)``.

    Without batches it runs as one jitted computation, cached per ``loss_fn`` (so a loss_fn
    closing over large arrays bakes them into the program as constants: pass the data as
    arguments of your own jit, or use ``batches``). Inside a caller's trace it is simply
    traced. Streaming runs eagerly, one jitted call per batch and step, so no more than one
    batch is ever on the device.
    """
    tracing = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))
    if batches is not None or tracing or not hashable(loss_fn):
        return impl(DatasetLoss(loss_fn, batches), *args, **static)
    return _whole(impl, loss_fn, tuple(sorted(static.items())), *args)


def _is_labelled_batch(batch: Any) -> bool:
    return (
        isinstance(batch, tuple | list)
        and len(batch) == 2
        and all(hasattr(a, "shape") and hasattr(a, "dtype") for a in batch)
    )


def labelled_batches(batch: Any, name: str = "batch") -> Iterable:
    """``batch`` as an iterable of ``(x, y)`` tuples: one tuple, or an iterable of them."""
    if _is_labelled_batch(batch):
        return (batch,)
    _check_iterable(batch, name)
    return batch


def check_labelled_batch(batch: Any, name: str = "batch") -> tuple[jax.Array, jax.Array]:
    if not _is_labelled_batch(batch):
        raise TypeError(
            f"{name} must be a tuple (x, y) of arrays or an iterable of such tuples, "
            f"got an element of type {type(batch).__name__}."
        )
    x, y = batch
    if not jnp.issubdtype(y.dtype, jnp.integer) or y.ndim != 1:
        raise TypeError(
            f"{name}: labels y must be a 1-D array of integer class indices (not one-hot), "
            f"got shape {y.shape} and dtype {y.dtype}."
        )
    if x.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: x and y must have the same number of examples, got shapes {x.shape} "
            f"and {y.shape}."
        )
    return x, y
