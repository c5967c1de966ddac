"""Streaming a measure over a dataset given as batches, in bounded memory.

Every measure is linear in the loss, or is built from quantities that are (HVPs, quadratic
forms, loss values and gradients). Over a dataset split into batches it is therefore the
example-weighted mean of the per-batch quantity; `DatasetLoss.accumulate` computes that mean,
one jitted call per batch, so only one batch is on the device at a time.

The compiled programs are cached on the user's function *as traced at this call*
(:class:`Program`), never on the function object, so that a function reading changed data
through a closure or a global is never answered from a stale compilation.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from sharpjax.sharpness._tree import Layout
from sharpjax.sharpness._validate import check_float_params

PyTree = Any

# Parameter values of a jaxpr equation that its text fully describes.
_PRINTED = (str, bytes, int, float, complex, bool, type(None), np.dtype, jax.core.AbstractValue)


class _Identity:
    """An unhashable object as a cache key, by identity; holding it keeps its id unique."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj


def _opaque(value: Any, out: list) -> None:
    """Collect what a jaxpr's text does not show: the functions in its equations' parameters
    (custom JVP/VJP rules print by name only) and the constants of nested closed jaxprs."""
    if isinstance(value, ClosedJaxpr):
        out.extend(_Identity(c) for c in value.consts)
        value = value.jaxpr
    if isinstance(value, Jaxpr):
        for eqn in value.eqns:
            for v in eqn.params.values():
                _opaque(v, out)
    elif isinstance(value, tuple | list):
        for v in value:
            _opaque(v, out)
    elif not isinstance(value, _PRINTED):
        try:
            hash(value)
        except TypeError:
            value = _Identity(value)
        out.append(value)


def _is_rule(value: Any) -> bool:
    return type(value).__name__ == "WrappedFun"


class Program:
    """A user's function as traced at this call: a jit-cache key that cannot go stale.

    Why: a jit cache keyed on the function object answers a function that reads changed data
    through a closure or a global with the program compiled for the old data. The jaxpr of the
    function records everything it read: arrays become constants, which :meth:`bind` passes to
    the compiled program as arguments, and Python numbers become literals in the jaxpr's text,
    which is (with the functions the text names only, see ``_opaque``) the key. A new lambda
    with the same body is the same program, so it reuses the compilation. The cost is one
    trace of the function per measure call (and per batch shape when streaming).
    """

    __slots__ = ("_hash", "_key", "consts", "in_avals", "in_tree", "jaxpr", "out_tree")

    def __init__(self, fn: Callable, *args: Any):
        # A new function each time: make_jaxpr caches traces per function object, which would
        # be stale in the same way.
        closed, shape = jax.make_jaxpr(lambda *a: fn(*a), return_shape=True)(*args)
        self.jaxpr = closed.jaxpr
        leaves, self.in_tree = jax.tree.flatten(args)
        self.in_avals = tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
        self.out_tree = jax.tree.structure(shape)
        opaque: list = []
        _opaque(self.jaxpr, opaque)
        texts = [str(self.jaxpr)]
        if any(_is_rule(o) for o in opaque):
            # Custom JVP rules (jax.nn.relu's, flax's) are new objects at every trace, so as
            # objects they would make every call a new program. They print by name only; the
            # text of the function's JVP in the params (what every measure differentiates)
            # adds the operations of the rules it inlines. Known limit: two custom-JVP functions
            # of the same name and primal but different rules, not inlined there, would share
            # a compilation.
            opaque = [o for o in opaque if not _is_rule(o)]
            try:
                tangents = jax.make_jaxpr(
                    lambda p, *rest: jax.jvp(lambda q: fn(q, *rest), (p,), (p,))
                )(*args).jaxpr
                texts.append(str(tangents))
            except Exception:  # e.g. a custom VJP has no JVP: the primal text only
                pass
        self._key = (*texts, self.in_tree, self.out_tree, tuple(opaque))
        self._hash = hash(self._key)
        self.consts = closed.consts

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Program) and other._key == self._key

    def bind(self, consts: list) -> Callable:
        """The function again, reading ``consts`` (arrays, or tracers under jit)."""

        def fn(*args: Any) -> Any:
            leaves, tree = jax.tree.flatten(args)
            avals = tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
            if tree != self.in_tree or avals != self.in_avals:
                # Internal: each traced function is called only with its traced signature.
                raise TypeError(f"traced for {self.in_avals}, called with {avals}.")
            out = jax.core.eval_jaxpr(self.jaxpr, consts, *leaves)
            return jax.tree.unflatten(self.out_tree, out)

        return fn


def trace(fn: Callable, *args: Any) -> tuple[Program, list]:
    """``(program, consts)``: the static jit key and the arrays to pass beside it."""
    program = Program(fn, *args)
    consts, program.consts = program.consts, None
    return program, consts


def is_tracing(*trees: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


@dataclass(frozen=True)
class SoftmaxCrossEntropy:
    """``loss(params, (x, y))``: mean softmax cross-entropy of ``logits_fn(params, x)``.

    A frozen dataclass rather than a closure, so that the GGN and Fisher products can read
    ``logits_fn`` (:mod:`sharpjax.sharpness.curvature`).
    """

    logits_fn: Callable

    def __call__(self, params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        log_p = jax.nn.log_softmax(self.logits_fn(params, x))
        return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))


def trace_loss(loss_fn: Callable, params: PyTree, batch: PyTree) -> tuple[Any, list]:
    """:func:`trace` of ``loss_fn(params, batch)``; of the logits inside a cross-entropy, which
    the GGN and Fisher products call on their own."""
    if isinstance(loss_fn, SoftmaxCrossEntropy) and _is_labelled_batch(batch):
        program, consts = trace(loss_fn.logits_fn, params, batch[0])
        return SoftmaxCrossEntropy(program), consts
    return trace(loss_fn, params, batch)


def bind_loss(static: Any, consts: list) -> Callable:
    if isinstance(static, SoftmaxCrossEntropy):
        return SoftmaxCrossEntropy(static.logits_fn.bind(consts))
    return static.bind(consts)


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


# fn and the traced loss are static so that every batch (and every call with the same loss)
# reuses one compilation; fn must therefore be a module-level function, not a closure.
@partial(jax.jit, static_argnums=(0, 1))
def _on_batch_jit(fn: Callable, static: Any, consts: list, params, batch, *operands: Any):
    return _on_batch(fn, bind_loss(static, consts), params, batch, *operands)


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

    def __init__(
        self,
        loss_fn: Callable,
        batches: Iterable | None = None,
        name: str = "batches",
        layout: Layout | None = None,
    ):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
        self.loss_fn = loss_fn
        # The params' sharding, for the vectors a measure builds (see _tree).
        self.layout = Layout() if layout is None else layout
        self.batches = batches
        self.name = name
        self.streaming = batches is not None
        self._one_shot = False
        self._passes = 0
        self._traced: dict = {}
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
        results = ((batch_size(b), self._on_batch(fn, params, b, *operands)) for b in self.batches)
        return weighted_mean(results, f"{self.name} is empty; pass at least one batch.")

    def _on_batch(self, fn: Callable, params: PyTree, batch: PyTree, *operands: Any) -> PyTree:
        if is_tracing(params, batch, operands):  # inside the caller's jit: simply traced
            return _on_batch(fn, self.loss_fn, params, batch, *operands)
        # Traced once per batch signature and call: the loss cannot change during a measure.
        signature = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), (params, batch))
        signature = (jax.tree.structure((params, batch)), tuple(jax.tree.leaves(signature)))
        if signature not in self._traced:
            self._traced[signature] = trace_loss(self.loss_fn, params, batch)
        static, consts = self._traced[signature]
        return _on_batch_jit(fn, static, consts, params, batch, *operands)

    def fori_loop(self, n: int, body: Callable, init: Any) -> Any:
        """``lax.fori_loop``, or a Python loop when every step has to stream the batches."""
        if self.streaming:
            for i in range(n):
                init = body(i, init)
            return init
        return jax.lax.fori_loop(0, n, body, init)


# impl, the traced loss and the static arguments key the compilation cache, so repeated calls
# with the same loss (e.g. over training checkpoints) compile once.
@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _whole(impl: Callable, program: Program, static: tuple, layout: Layout, consts, *args: Any):
    return impl(DatasetLoss(program.bind(consts), layout=layout), *args, **dict(static))


def evaluate(impl: Callable, loss_fn: Callable, batches: Iterable | None, *args: Any, **static):
    """``impl(loss, *args, **static)`` with ``loss = DatasetLoss(loss_fn, batches)``.

    Without batches it runs as one jitted computation, cached per traced loss
    (:class:`Program`: the arrays ``loss_fn`` reads are passed as arguments, never baked in).
    Inside a caller's trace it is simply traced. Streaming runs eagerly, one jitted call per
    batch and step, so no more than one batch is ever on the device.
    """
    params = args[0]  # every measure passes params first
    check_float_params(params)
    layout = Layout(params)
    if batches is not None or is_tracing(args):
        return impl(DatasetLoss(loss_fn, batches, layout=layout), *args, **static)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    program, consts = trace(loss_fn, params)
    return _whole(impl, program, tuple(sorted(static.items())), layout, consts, *args)


def compile_measure(impl: Callable, loss_fn: Callable, *args: Any, **static: Any):
    """The program :func:`evaluate` runs without batches, compiled but not run: for
    ``.memory_analysis()`` in benchmarks and tests (``impl`` a measure's ``_impl``)."""
    params = args[0]
    program, consts = trace(loss_fn, params)
    static = tuple(sorted(static.items()))
    return _whole.lower(impl, program, static, Layout(params), consts, *args).compile()


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
