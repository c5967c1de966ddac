"""Curvature operators: Hessian, generalised Gauss–Newton (GGN) and empirical Fisher products.

Each operator maps flat probes ``V`` of shape ``(m, d)`` to the rows of ``V C`` (``C``
symmetric), with all probes vectorised at once, and never forms ``C`` or a Jacobian:

- ``"hessian"``: ``H v = ∂/∂t ∇L(w + t v)``, forward-over-reverse.
- ``"ggn"``: for the mean softmax cross-entropy ``L = (1/n) Σ_i CE(f(w, x_i), y_i)``,
  ``G v = (1/n) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i v`` with ``J_i = ∂f(w, x_i)/∂w`` and
  ``p_i = softmax(f(w, x_i))``: one linearised forward pass (``J v``), the logit-space Hessian,
  one pullback (``Jᵀ u``) (Schraudolph 2002; Martens 2020, *New insights and perspectives on the
  natural gradient method*, JMLR). It is positive semi-definite, and for softmax cross-entropy
  equals the (true) Fisher information of the model's predictive distribution.
- ``"fisher"``: the empirical Fisher ``F = (1/n) Σ_i g_i g_iᵀ``, ``g_i = ∇_w CE(f(w, x_i), y_i)``
  at the observed labels: ``F v = (1/n) Σ_i g_i (g_iᵀ v)`` from one JVP of the per-example losses
  and one pullback, never the per-example gradients (Kunstner, Balles & Hennig, NeurIPS 2019,
  on how it differs from the Fisher).

GGN and Fisher need the data and the logits: pass
``loss_fn=SoftmaxCrossEntropy(logits_fn)`` and ``batches=[(x, y), ...]`` to a measure.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpjax.sharpness._batches import (
    BatchLoss,
    DatasetLoss,
    check_labelled_batch,
    labelled_batches,
)
from sharpjax.sharpness._validate import choice

PyTree = Any

CURVATURES = ("hessian", "ggn", "fisher")


@dataclass(frozen=True)
class SoftmaxCrossEntropy:
    """``loss(params, (x, y))``: mean softmax cross-entropy of ``logits_fn(params, x)``.

    A frozen dataclass rather than a closure so that equal ``logits_fn`` give equal (hashable)
    losses and jit caches are shared across calls.
    """

    logits_fn: Callable

    def __call__(self, params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        log_p = jax.nn.log_softmax(self.logits_fn(params, x))
        return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))


def hvp_rows(loss: Callable, params: PyTree, V: jax.Array) -> jax.Array:
    """Rows of ``V @ H`` for flat probes ``V`` of shape ``(m, d)``, forward-over-reverse.

    All probes are vectorised at once (memory ∝ m × the batch's activations; stream smaller
    batches to bound it): on CPU, looping over chunks of probes with lax.map ran convolutional
    networks 6x slower per HVP than one vmap.
    """
    flat, unravel = ravel_pytree(params)
    grad_flat = jax.grad(lambda x: loss(unravel(x)))
    return jax.vmap(lambda v: jax.jvp(grad_flat, (flat,), (v,))[1])(V)


def _logits_and_batch(loss: Callable):
    # check_curvature has vetted the loss before any tracing; this only unpacks it.
    return loss.loss_fn.logits_fn, loss.batch


def ggn_rows(loss: BatchLoss, params: PyTree, V: jax.Array) -> jax.Array:
    """Rows of ``V @ G`` (softmax cross-entropy GGN) on one batch."""
    logits_fn, (x, _) = _logits_and_batch(loss)
    flat, unravel = ravel_pytree(params)
    f = lambda w: logits_fn(unravel(w), x)
    z, jvp = jax.linearize(f, flat)
    pullback = jax.vjp(f, flat)[1]
    p = jax.nn.softmax(z)
    JV = jax.vmap(jvp)(V)  # (m, n, K)
    # (diag(p) − ppᵀ) J v per example, with the 1/n of the mean loss. pᵀJv is an einsum: the
    # same sum written jnp.sum(p * JV, -1, keepdims=True) was miscompiled by XLA:CPU under jit
    # (jax 0.10.2: rows from the 13th probe on were wrong by up to 20x; see
    # tests/test_sharpness_curvature.py::test_ggn_quadratic_forms_under_jit_in_float32).
    U = p * (JV - jnp.einsum("mnk,nk->mn", JV, p)[..., None]) / z.shape[0]
    return jax.vmap(lambda u: pullback(u)[0])(U)


def fisher_rows(loss: BatchLoss, params: PyTree, V: jax.Array) -> jax.Array:
    """Rows of ``V @ F`` (empirical Fisher of the softmax cross-entropy) on one batch."""
    logits_fn, (x, y) = _logits_and_batch(loss)
    flat, unravel = ravel_pytree(params)

    def losses(w):
        log_p = jax.nn.log_softmax(logits_fn(unravel(w), x))
        return -jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]

    ell, jvp = jax.linearize(losses, flat)
    pullback = jax.vjp(losses, flat)[1]
    return jax.vmap(lambda v: pullback(jvp(v) / ell.shape[0])[0])(V)


_ROWS = {"hessian": hvp_rows, "ggn": ggn_rows, "fisher": fisher_rows}


@dataclass(frozen=True)
class Operator:
    """``(loss, params, V) -> rows of V C`` (or ``vᵀ C v`` per row with ``quadratic=True``).

    With ``block=(start, stop)`` the operator is the diagonal block ``C[start:stop, start:stop]``
    of the flat parameter vector: ``V`` then has ``stop − start`` columns. A frozen dataclass, so
    equal operators are equal jit-cache keys across calls and batches.
    """

    curvature: str = "hessian"
    block: tuple[int, int] | None = None
    quadratic: bool = False

    def __call__(self, loss: Callable, params: PyTree, V: jax.Array) -> jax.Array:
        rows = _ROWS[self.curvature]
        if self.block is None:
            R = rows(loss, params, V)
        else:
            start, stop = self.block
            d = ravel_pytree(params)[0].size
            full = jnp.zeros((V.shape[0], d), V.dtype).at[:, start:stop].set(V)
            R = rows(loss, params, full)[:, start:stop]
        return jnp.sum(V * R, axis=1) if self.quadratic else R


def check_curvature(curvature: str, loss_fn: Callable, batches: Iterable | None) -> str:
    """Vet ``curvature`` and, for GGN and Fisher, that the loss carries its logits and data."""
    choice("curvature", curvature, CURVATURES)
    if curvature == "hessian":
        return curvature
    if not isinstance(loss_fn, SoftmaxCrossEntropy) or batches is None:
        raise TypeError(
            f'curvature="{curvature}" is defined for the softmax cross-entropy of a logits '
            "function and needs the data: pass loss_fn=sharpness.SoftmaxCrossEntropy(logits_fn) "
            "and batches=[(x, y), ...] (integer labels)."
        )
    return curvature


@dataclass(frozen=True)
class Block:
    """A top-level parameter collection as a slice ``[start, stop)`` of the flat vector."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def blocks(params: PyTree) -> list[Block]:
    """One :class:`Block` per top-level entry of ``params`` (e.g. per flax layer).

    ``ravel_pytree`` concatenates the leaves in ``jax.tree.leaves`` order, in which the leaves of
    one top-level entry are consecutive, so each entry is one contiguous slice.
    """
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    if not paths or not paths[0][0]:
        raise ValueError(
            "per_layer=True needs params with top-level entries (e.g. flax's "
            "{'Dense_0': {...}, 'Dense_1': {...}}), got a single array."
        )
    out: list[Block] = []
    offset = 0
    for path, leaf in paths:
        name = _key_name(path[0])
        size = int(jnp.size(leaf))
        if out and out[-1].name == name:
            out[-1] = Block(name, out[-1].start, offset + size)
        else:
            out.append(Block(name, offset, offset + size))
        offset += size
    return out


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def block_subtree(params: PyTree, block: Block) -> PyTree:
    """The entry of ``params`` that ``block`` covers (for unflattening block vectors)."""
    top = lambda x: x is not params  # every child of the root is a "leaf"
    for path, sub in jax.tree_util.tree_flatten_with_path(params, is_leaf=top)[0]:
        if _key_name(path[0]) == block.name:
            return sub
    raise KeyError(block.name)


def _vector_product(curvature, logits_fn, params, v, batch):
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}.")
    if jax.tree.structure(v) != jax.tree.structure(params):
        raise ValueError(
            "v must have the same pytree structure as params, got "
            f"{jax.tree.structure(v)} vs {jax.tree.structure(params)}."
        )
    checked = (check_labelled_batch(b) for b in labelled_batches(batch))
    loss = DatasetLoss(SoftmaxCrossEntropy(logits_fn), checked, name="batch")
    flat_v, _ = ravel_pytree(v)
    unravel = ravel_pytree(params)[1]
    return unravel(loss.accumulate(Operator(curvature), params, flat_v[None])[0])


def ggn_vector_product(
    logits_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    v: PyTree,
    batch: tuple[jax.Array, jax.Array] | Iterable[tuple[jax.Array, jax.Array]],
) -> PyTree:
    """``G v``, the generalised Gauss–Newton product of the mean softmax cross-entropy.

    ``G = (1/n) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i`` (see :mod:`sharpjax.sharpness.curvature`),
    by one JVP and one VJP through ``logits_fn``; ``J`` is never formed.

    Args:
      logits_fn: ``logits_fn(params, x) -> logits`` of shape ``(n, K)``.
      params: the point ``w``.
      v: the direction, structure of ``params``.
      batch: ``(x, y)`` with integer labels, or an iterable of such tuples (example-weighted).

    Returns:
      ``G v`` with the structure of ``params``.
    """
    return _vector_product("ggn", logits_fn, params, v, batch)


def fisher_vector_product(
    logits_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    v: PyTree,
    batch: tuple[jax.Array, jax.Array] | Iterable[tuple[jax.Array, jax.Array]],
) -> PyTree:
    """``F v``, the empirical Fisher ``F = (1/n) Σ_i g_i g_iᵀ`` of the softmax cross-entropy.

    ``g_i`` is the gradient of example ``i``'s loss at its observed label; ``F v`` is one JVP of
    the per-example losses and one VJP, never the per-example gradients. Arguments as for
    :func:`ggn_vector_product`.
    """
    return _vector_product("fisher", logits_fn, params, v, batch)
