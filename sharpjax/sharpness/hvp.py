"""Hessian-vector products and Hessian trace estimators (Hutchinson, Hutch++)."""

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpjax.sharpness._batches import DatasetLoss, evaluate
from sharpjax.sharpness._validate import choice, positive_int

PyTree = Any


def _hvp_tree(loss: Callable, params: PyTree, v: PyTree) -> PyTree:
    return jax.jvp(jax.grad(loss), (params,), (v,))[1]


def hvp_rows(loss: Callable, params: PyTree, V: jax.Array) -> jax.Array:
    """Rows of ``V @ H`` for flat probes ``V`` of shape ``(m, d)``, forward-over-reverse.

    All probes are vectorised at once (memory ∝ m × the batch's activations; stream smaller
    batches to bound it): on CPU, looping over chunks of probes with lax.map ran convolutional
    networks 6x slower per HVP than one vmap.
    """
    flat, unravel = ravel_pytree(params)
    grad_flat = jax.grad(lambda x: loss(unravel(x)))
    return jax.vmap(lambda v: jax.jvp(grad_flat, (flat,), (v,))[1])(V)


def quadratic_forms(loss: Callable, params: PyTree, V: jax.Array) -> jax.Array:
    """``vᵀ H v`` for every row ``v`` of ``V``."""
    return jnp.sum(V * hvp_rows(loss, params, V), axis=1)


def hvp(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    v: PyTree,
    *,
    batches: Iterable | None = None,
) -> PyTree:
    """Hessian-vector product ``H v = ∂/∂t ∇L(w + t v)|_{t=0}``, forward-over-reverse.

    Computed as ``jax.jvp(jax.grad(L), (w,), (v,))``: one gradient's cost, never a dense
    Hessian. ``v`` has the structure of ``params``.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, or ``loss_fn(params, batch) -> scalar`` (a mean
        over the batch's examples) when ``batches`` is given.
      params: the point ``w``, any pytree.
      v: the direction, same pytree structure as ``params``.
      batches: optional iterable of batches (a one-shot generator is fine here); ``H`` is then
        the Hessian of the example-weighted mean loss over all of them.

    Returns:
      ``H v`` with the structure of ``params``.
    """
    if jax.tree.structure(v) != jax.tree.structure(params):
        raise ValueError(
            "v must have the same pytree structure as params, got "
            f"{jax.tree.structure(v)} vs {jax.tree.structure(params)}."
        )
    return evaluate(_hvp, loss_fn, batches, params, v)


def _hvp(loss: DatasetLoss, params: PyTree, v: PyTree) -> PyTree:
    return loss.accumulate(_hvp_tree, params, v)


class TraceEstimate(NamedTuple):
    """A stochastic estimate of ``tr(H)``.

    Attributes:
      value: the estimate.
      std_error: standard error of the Monte Carlo part (for Hutch++, of its residual
        Hutchinson term); NaN when that part has a single probe.

    Either method spends exactly ``num_samples`` Hessian-vector products.
    """

    value: jax.Array
    std_error: jax.Array


def _mean_and_std_error(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.mean(x), jnp.std(x, ddof=1) / jnp.sqrt(x.shape[0])


def hessian_trace(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    key: jax.Array,
    num_samples: int = 100,
    method: str = "hutchinson",
    *,
    batches: Iterable | None = None,
) -> TraceEstimate:
    """Stochastic estimate of the Hessian trace with ``num_samples`` HVPs.

    ``"hutchinson"`` (Hutchinson 1989): ``tr(H) ≈ (1/m) Σ_i v_iᵀ H v_i`` with Rademacher
    ``v_i``; unbiased, variance ``2(‖H‖_F² − Σ_j H_jj²)/m``.

    ``"hutch++"`` (Meyer, Musco, Musco & Woodruff, SOSA 2021), same budget ``m``: sketch
    ``Q = qr(H S)`` with ``k = m // 3`` Rademacher columns ``S``, then
    ``tr(H) ≈ tr(Qᵀ H Q) + (1/r) Σ_i g_iᵀ (I − QQᵀ) H (I − QQᵀ) g_i`` with the remaining
    ``r = m − 2k`` probes. The sketch takes the top of the spectrum exactly into account, so
    the error is much lower when the spectrum decays (as for trained networks); it is exact
    once ``k`` reaches the parameter count. Needs ``num_samples >= 3``.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, or ``loss_fn(params, batch)`` with ``batches``.
      params: any pytree.
      key: PRNG key for the probes.
      num_samples: HVP budget ``m`` (default 100).
      method: ``"hutchinson"`` (default) or ``"hutch++"``.
      batches: optional iterable of batches; the trace is then that of the example-weighted
        mean loss (Hutchinson reads the data once, Hutch++ twice).

    Returns:
      A :class:`TraceEstimate`.
    """
    positive_int("num_samples", num_samples)
    choice("method", method, ("hutchinson", "hutch++"))
    if method == "hutch++" and num_samples < 3:
        raise ValueError(
            f"hutch++ needs num_samples >= 3 (sketch, its image, residual), got {num_samples}."
        )
    return evaluate(
        _hessian_trace, loss_fn, batches, params, key, num_samples=num_samples, method=method
    )


def _hessian_trace(
    loss: DatasetLoss, params: PyTree, key: jax.Array, *, num_samples: int, method: str
) -> TraceEstimate:
    flat, _ = ravel_pytree(params)
    if method == "hutchinson":
        V = jax.random.rademacher(key, (num_samples, flat.size), flat.dtype)
        value, std_error = _mean_and_std_error(loss.accumulate(quadratic_forms, params, V))
        return TraceEstimate(value, std_error)
    k = num_samples // 3
    key_s, key_g = jax.random.split(key)
    S = jax.random.rademacher(key_s, (k, flat.size), flat.dtype)
    Q = jnp.linalg.qr(loss.accumulate(hvp_rows, params, S).T)[0]
    G = jax.random.rademacher(key_g, (num_samples - 2 * k, flat.size), flat.dtype)
    G = G - (G @ Q) @ Q.T
    # One pass over the data gives both the sketched trace and the residual probes.
    quads = loss.accumulate(quadratic_forms, params, jnp.concatenate([Q.T, G]))
    residual, std_error = _mean_and_std_error(quads[Q.shape[1] :])
    return TraceEstimate(jnp.sum(quads[: Q.shape[1]]) + residual, std_error)
