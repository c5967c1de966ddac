"""Curvature operators: Hessian, generalised Gauss–Newton (GGN) and empirical Fisher products.

Each operator maps a stack of probes ``V`` (``m`` vectors shaped like the params, each leaf with
a leading axis ``m``; :mod:`sharpjax.sharpness._tree`) to ``(C v_i)_i`` in the same layout,
with all probes vectorised at once, and never forms ``C`` or a Jacobian:

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

from sharpjax.sharpness._batches import (
    BatchLoss,
    DatasetLoss,
    SoftmaxCrossEntropy,
    check_labelled_batch,
    labelled_batches,
)
from sharpjax.sharpness._tree import key_name, row, stacked_dots_rows
from sharpjax.sharpness._validate import check_float_params, choice

PyTree = Any

__all__ = [
    "SoftmaxCrossEntropy",
    "fisher_vector_product",
    "ggn_vector_product",
    "hvp_rows",
]

CURVATURES = ("hessian", "ggn", "fisher")


def hvp_rows(loss: Callable, params: PyTree, V: PyTree) -> PyTree:
    """``(H v_i)_i`` for a stack of probes ``V`` (each leaf with a leading axis ``m``),
    forward-over-reverse, in the params' layout.

    All probes are vectorised at once (memory ∝ m × the batch's activations; stream smaller
    batches to bound it): on CPU, looping over chunks of probes with lax.map ran convolutional
    networks 6x slower per HVP than one vmap.
    """
    grad = jax.grad(loss)
    return jax.vmap(lambda v: jax.jvp(grad, (params,), (v,))[1])(V)


def _logits_and_batch(loss: Callable):
    # check_curvature has vetted the loss before any tracing; this only unpacks it.
    return loss.loss_fn.logits_fn, loss.batch


def ggn_rows(loss: BatchLoss, params: PyTree, V: PyTree) -> PyTree:
    """``(G v_i)_i`` (softmax cross-entropy GGN) on one batch, for a stack of probes ``V``."""
    logits_fn, (x, _) = _logits_and_batch(loss)
    f = lambda w: logits_fn(w, x)
    z, jvp = jax.linearize(f, params)
    pullback = jax.vjp(f, params)[1]
    p = jax.nn.softmax(z)
    JV = jax.vmap(jvp)(V)  # (m, n, K)
    # (diag(p) − ppᵀ) J v per example, with the 1/n of the mean loss. pᵀJv is an einsum: the
    # same sum written jnp.sum(p * JV, -1, keepdims=True) was miscompiled by XLA:CPU under jit
    # (jax 0.10.2: rows from the 13th probe on were wrong by up to 20x; see
    # tests/test_sharpness_curvature.py::test_ggn_quadratic_forms_under_jit_in_float32).
    U = p * (JV - jnp.einsum("mnk,nk->mn", JV, p)[..., None]) / z.shape[0]
    return jax.vmap(lambda u: pullback(u)[0])(U)


def fisher_rows(loss: BatchLoss, params: PyTree, V: PyTree) -> PyTree:
    """``(F v_i)_i`` (empirical Fisher of the softmax cross-entropy) on one batch."""
    logits_fn, (x, y) = _logits_and_batch(loss)

    def losses(w):
        log_p = jax.nn.log_softmax(logits_fn(w, x))
        return -jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]

    ell, jvp = jax.linearize(losses, params)
    pullback = jax.vjp(losses, params)[1]
    return jax.vmap(lambda v: pullback(jvp(v) / ell.shape[0])[0])(V)


_ROWS = {"hessian": hvp_rows, "ggn": ggn_rows, "fisher": fisher_rows}


def with_block(params: PyTree, name: str, sub: PyTree) -> PyTree:
    """``params`` with its top-level entry ``name`` replaced by ``sub``."""
    top = lambda x: x is not params  # every child of the root is a "leaf"
    paths, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=top)
    children = [sub if key_name(path[0]) == name else c for path, c in paths]
    return jax.tree.unflatten(treedef, children)


def restrict(loss: Callable, params: PyTree, name: str, curvature: str) -> tuple[Callable, PyTree]:
    """The loss as a function of the top-level entry ``name`` alone, the others held at
    ``params``; and that entry. Its curvature is the diagonal block ``C_bb``."""
    sub = block_subtree(params, name)
    if curvature == "hessian":
        return (lambda b: loss(with_block(params, name, b))), sub
    logits_fn, batch = _logits_and_batch(loss)
    restricted = lambda b, x: logits_fn(with_block(params, name, b), x)
    return BatchLoss(SoftmaxCrossEntropy(restricted), batch), sub


@dataclass(frozen=True)
class Operator:
    """``(loss, params, V) -> (C v_i)_i`` for a stack of probes ``V`` shaped like ``params``
    (or ``(v_iᵀ C v_i)_i`` with ``quadratic=True``).

    With ``block=name`` the operator is the diagonal block ``C_bb`` of the top-level entry
    ``name`` of ``params``: ``V`` is then shaped like that entry, and the other entries are
    held fixed (only the block is differentiated). A frozen dataclass, so equal operators are
    equal jit-cache keys across calls and batches.
    """

    curvature: str = "hessian"
    block: str | None = None
    quadratic: bool = False

    def __call__(self, loss: Callable, params: PyTree, V: PyTree) -> PyTree:
        if self.block is not None:
            loss, params = restrict(loss, params, self.block, self.curvature)
        R = _ROWS[self.curvature](loss, params, V)
        return stacked_dots_rows(V, R) if self.quadratic else R


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


def blocks(params: PyTree) -> list[tuple[str, PyTree]]:
    """``(name, entry)`` for each top-level entry of ``params`` (e.g. per flax layer)."""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    if not paths or not paths[0][0]:
        raise ValueError(
            "per_layer=True needs params with top-level entries (e.g. flax's "
            "{'Dense_0': {...}, 'Dense_1': {...}}), got a single array."
        )
    top = lambda x: x is not params
    return [
        (key_name(path[0]), sub)
        for path, sub in jax.tree_util.tree_flatten_with_path(params, is_leaf=top)[0]
    ]


def block_subtree(params: PyTree, name: str) -> PyTree:
    """The top-level entry ``name`` of ``params``."""
    top = lambda x: x is not params  # every child of the root is a "leaf"
    for path, sub in jax.tree_util.tree_flatten_with_path(params, is_leaf=top)[0]:
        if key_name(path[0]) == name:
            return sub
    raise KeyError(name)


def _vector_product(curvature, logits_fn, params, v, batch):
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}.")
    if jax.tree.structure(v) != jax.tree.structure(params):
        raise ValueError(
            "v must have the same pytree structure as params, got "
            f"{jax.tree.structure(v)} vs {jax.tree.structure(params)}."
        )
    check_float_params(params)
    checked = (check_labelled_batch(b) for b in labelled_batches(batch))
    loss = DatasetLoss(SoftmaxCrossEntropy(logits_fn), checked, name="batch")
    stack = jax.tree.map(lambda x: x[None], v)
    return row(loss.accumulate(Operator(curvature), params, stack), 0)


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
