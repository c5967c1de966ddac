"""Adaptive sharpness (Andriushchenko, Croce, Müller, Hein & Flammarion, ICML 2023)."""

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sharpjax.core import tree_add
from sharpjax.sharpness._batches import DatasetLoss, evaluate
from sharpjax.sharpness._tree import gaussian, norm
from sharpjax.sharpness._validate import (
    choice,
    is_key,
    positive_int,
    positive_number,
    require_key,
    valid,
)

PyTree = Any


class AdaptiveSharpnessResult(NamedTuple):
    """Adaptive sharpness.

    Attributes:
      value: ``L(w + δ) − L(w)`` at the worst ``δ`` found (``kind="worst"``) or its mean over the
        Gaussian ``δ`` (``kind="average"``).
      delta: the worst-case perturbation (structure of ``params``), ``None`` for "average".
      std_error: Monte Carlo standard error for "average", ``None`` for "worst".
    """

    value: jax.Array
    delta: PyTree | None
    std_error: jax.Array | None


# Perturbations δ, γ and gradients are pytrees shaped (and sharded) like the params.


def _losses(loss: Callable, params: PyTree, deltas: PyTree) -> jax.Array:
    return jax.vmap(lambda d: loss(tree_add(params, d)))(deltas)


def _loss_and_grad(loss: Callable, params: PyTree, delta: PyTree):
    return jax.value_and_grad(lambda d: loss(tree_add(params, d)))(delta)


def _scaled(tree: PyTree, c: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: x * c.astype(x.dtype), tree)


def _unit(g: PyTree) -> PyTree:
    # eps-safe: a zero gradient gives a zero step, never NaN.
    n = norm(g)
    return _scaled(g, 1 / jnp.where(n > 0, n, 1))


@jax.jit
def _ascent_step(gamma, value, g, best_value, best_gamma, rho, eta):
    """Keep the best iterate, then ``γ ← Π_ρ(γ + η ∇/‖∇‖)``; jitted once for streaming."""
    better = value > best_value
    best_value = jnp.where(better, value, best_value)
    best_gamma = jax.tree.map(lambda a, b: jnp.where(better, a, b), gamma, best_gamma)
    gamma = tree_add(gamma, _scaled(_unit(g), eta))
    n = norm(gamma)
    gamma = _scaled(gamma, jnp.minimum(1, rho / jnp.where(n > 0, n, 1)))
    return gamma, best_value, best_gamma


def adaptive_sharpness(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    rho: float,
    kind: str = "worst",
    key: jax.Array | None = None,
    num_steps: int = 20,
    num_samples: int = 100,
    step_size: float | None = None,
    *,
    batches: Iterable | None = None,
) -> AdaptiveSharpnessResult:
    """Elementwise adaptive sharpness, invariant to per-parameter rescaling of ``w``.

    Worst case: ``S_max = max_{‖δ ⊘ |w|‖₂ ≤ ρ} L(w + δ) − L(w)``, by projected normalised
    gradient ascent in the rescaled variable ``γ = δ ⊘ |w|`` (``δ = |w| ⊙ γ``, ball ``‖γ‖ ≤ ρ``):
    start at ``γ = ρ ĝ`` (the SAM step, ``g = |w| ⊙ ∇L(w)``), then
    ``γ ← Π_ρ(γ + η ∇_γ/‖∇_γ‖)`` for ``num_steps`` steps (default 20), ``η = step_size``
    (default ``ρ``). The paper uses Auto-PGD; this plainer ascent keeps the best iterate
    (including ``δ = 0``), so the value is a lower bound of the maximum, never negative, and
    attained by the returned ``delta``.

    Average case: ``S_avg = E_{δ ∼ N(0, ρ² diag(w²))} L(w + δ) − L(w)`` by Monte Carlo with
    ``num_samples`` draws (default 100). Note that ``‖δ ⊘ |w|‖ ≈ ρ √d`` here, so the same ρ is
    a much larger perturbation than in the worst case (the paper uses different ρ's).

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, or ``loss_fn(params, batch)`` with ``batches``.
      params: the point ``w``, any pytree.
      rho: radius ρ > 0.
      kind: ``"worst"`` (default) or ``"average"``.
      key: PRNG key, required for "average".
      num_steps: ascent steps for "worst" (each one gradient).
      num_samples: Monte Carlo samples for "average".
      step_size: ascent step in the rescaled variable (default ``rho``).
      batches: optional iterable of batches; the loss is then the example-weighted mean over
        them ("average" reads the data once with the same δ's for every batch; "worst" reads
        it ``num_steps + 2`` times and needs a re-iterable).

    Returns:
      An :class:`AdaptiveSharpnessResult`. ``rho`` and ``step_size`` are checked when concrete;
      traced ones (inside your jit) cannot be, and a value that is not finite and > 0 then
      gives a NaN result.
    """
    if is_key(rho) or is_key(kind):
        raise TypeError(
            "adaptive_sharpness got a PRNG key as rho or kind; its signature is "
            "adaptive_sharpness(loss_fn, params, rho, kind='worst', key=None, ...), unlike the "
            "other measures' (loss_fn, params, key): pass the radius third and the key by "
            "keyword, e.g. adaptive_sharpness(loss_fn, params, 0.05, 'average', key=key)."
        )
    choice("kind", kind, ("worst", "average"))
    positive_number("rho", rho)
    if kind == "average":
        require_key(key, 'for kind="average"')
        positive_int("num_samples", num_samples)
        return evaluate(_average, loss_fn, batches, params, rho, key, num_samples=num_samples)
    positive_int("num_steps", num_steps)
    if step_size is not None:
        positive_number("step_size", step_size)
    return evaluate(_worst, loss_fn, batches, params, rho, step_size, num_steps=num_steps)


def _average(
    loss: DatasetLoss, params: PyTree, rho: jax.Array, key: jax.Array, *, num_samples: int
) -> AdaptiveSharpnessResult:
    rho = valid(rho)
    noise = gaussian(key, params, (num_samples,))
    # Row 0 is δ = 0, the loss at w.
    deltas = jax.tree.map(
        lambda w, z: jnp.concatenate([jnp.zeros((1, *w.shape), w.dtype), rho * jnp.abs(w) * z]),
        params,
        noise,
    )
    values = loss.accumulate(_losses, params, loss.layout.stack(deltas))
    diffs = values[1:] - values[0]
    return AdaptiveSharpnessResult(
        jnp.mean(diffs), None, jnp.std(diffs, ddof=1) / jnp.sqrt(num_samples)
    )


def _worst(
    loss: DatasetLoss,
    params: PyTree,
    rho: jax.Array,
    step_size: jax.Array | None,
    *,
    num_steps: int,
) -> AdaptiveSharpnessResult:
    scale = jax.tree.map(jnp.abs, params)
    times = lambda a, b: jax.tree.map(jnp.multiply, a, b)
    rho = valid(rho)
    eta = rho if step_size is None else valid(step_size)

    def loss_and_grad(gamma):
        value, g = loss.accumulate(_loss_and_grad, params, times(scale, gamma))
        return value, times(scale, g)

    def body(_, carry):
        gamma, best_value, best_gamma = carry
        value, g = loss_and_grad(gamma)
        gamma, best_value, best_gamma = _ascent_step(
            gamma, value, g, best_value, best_gamma, rho, eta
        )
        return loss.layout.vector(gamma), best_value, loss.layout.vector(best_gamma)

    zero = loss.layout.vector(jax.tree.map(jnp.zeros_like, params))
    base, g0 = loss_and_grad(zero)
    init = (_scaled(_unit(g0), rho), base, zero)
    gamma, best_value, best_gamma = loss.fori_loop(num_steps, body, init)
    # The last iterate has not been evaluated yet.
    _, best_value, best_gamma = body(None, (gamma, best_value, best_gamma))
    # The ascent keeps the best of comparisons that a NaN radius never wins: say NaN instead.
    value = jnp.where(jnp.isnan(rho) | jnp.isnan(eta), jnp.nan, best_value - base)
    return AdaptiveSharpnessResult(value, times(scale, best_gamma), None)
