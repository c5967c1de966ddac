"""Adaptive sharpness (Andriushchenko, Croce, Müller, Hein & Flammarion, ICML 2023)."""

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpjax.sharpness._batches import DatasetLoss, evaluate
from sharpjax.sharpness._validate import choice, positive_int, positive_number, require_key

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


def _losses(loss: Callable, params: PyTree, deltas: jax.Array) -> jax.Array:
    flat, unravel = ravel_pytree(params)
    return jax.vmap(lambda d: loss(unravel(flat + d)))(deltas)


def _loss_and_grad(loss: Callable, params: PyTree, delta: jax.Array):
    flat, unravel = ravel_pytree(params)
    return jax.value_and_grad(lambda d: loss(unravel(flat + d)))(delta)


def _unit(g: jax.Array) -> jax.Array:
    # eps-safe: a zero gradient gives a zero step, never NaN.
    norm = jnp.linalg.norm(g)
    return g / jnp.where(norm > 0, norm, 1)


@jax.jit
def _ascent_step(gamma, value, g, best_value, best_gamma, rho, eta):
    """Keep the best iterate, then ``γ ← Π_ρ(γ + η ∇/‖∇‖)``; jitted once for streaming."""
    better = value > best_value
    best_value = jnp.where(better, value, best_value)
    best_gamma = jnp.where(better, gamma, best_gamma)
    gamma = gamma + eta * _unit(g)
    norm = jnp.linalg.norm(gamma)
    gamma = gamma * jnp.minimum(1, rho / jnp.where(norm > 0, norm, 1))
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
      An :class:`AdaptiveSharpnessResult`.
    """
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
    flat, _ = ravel_pytree(params)
    scale = jnp.abs(flat)
    noise = jax.random.normal(key, (num_samples, flat.size), flat.dtype)
    deltas = jnp.concatenate([jnp.zeros((1, flat.size), flat.dtype), rho * scale * noise])
    values = loss.accumulate(_losses, params, deltas)
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
    flat, unravel = ravel_pytree(params)
    scale = jnp.abs(flat)
    eta = rho if step_size is None else step_size

    def loss_and_grad(gamma):
        value, g = loss.accumulate(_loss_and_grad, params, scale * gamma)
        return value, scale * g

    def body(_, carry):
        gamma, best_value, best_gamma = carry
        value, g = loss_and_grad(gamma)
        return _ascent_step(gamma, value, g, best_value, best_gamma, rho, eta)

    base, g0 = loss_and_grad(jnp.zeros_like(flat))
    init = (rho * _unit(g0), base, jnp.zeros_like(flat))
    gamma, best_value, best_gamma = loss.fori_loop(num_steps, body, init)
    # The last iterate has not been evaluated yet.
    _, best_value, best_gamma = body(None, (gamma, best_value, best_gamma))
    return AdaptiveSharpnessResult(best_value - base, unravel(scale * best_gamma), None)
