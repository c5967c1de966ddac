"""Perturbation rules: where the second gradient is taken.

Each rule maps the clean gradient ``g`` (and the params, and its own state) to ``ε``.
Norms are global L2 norms over the whole pytree and every division is eps-safe, so a zero
gradient gives a zero perturbation. Equations and sources: the project's docs/algorithms.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sharpjax.core import (
    NORM_EPS,
    PerturbationRule,
    check_constant,
    check_scalar_or_schedule,
    compute_dtype,
    tree_norm,
    tree_scale,
)


def _normalized(direction: Any, rho: jax.Array) -> tuple[Any, jax.Array]:
    """``ρ · direction / ‖direction‖`` (zero for a zero direction) and its norm."""
    norm = tree_norm(direction)
    return tree_scale(direction, rho / (norm + NORM_EPS)), rho * norm / (norm + NORM_EPS)


def sam_perturbation() -> PerturbationRule:
    """SAM (Foret et al., ICLR 2021): ``ε = ρ g / ‖g‖``."""

    def perturb(g, params, state, rho):
        del params
        eps, eps_norm = _normalized(g, rho)
        return eps, state, {"perturbation_norm": eps_norm}

    return PerturbationRule(lambda params: (), perturb)


def adaptive_perturbation(eta: float = 0.01) -> PerturbationRule:
    """ASAM (Kwon et al., ICML 2021): ``ε = ρ T² g / ‖T g‖`` with ``T = |w| + η``."""
    check_constant("eta", eta)
    check_scalar_or_schedule("eta", eta, 0.0)

    def perturb(g, params, state, rho):
        eta_t = jnp.maximum(eta, 0.0)  # a traced eta (inject_hyperparams) is clamped to ≥ 0
        scale = jax.tree.map(lambda w: jnp.abs(w.astype(compute_dtype(w))) + eta_t, params)
        tg = jax.tree.map(lambda t, x: t * x.astype(t.dtype), scale, g)
        factor = rho / (tree_norm(tg) + NORM_EPS)
        eps = jax.tree.map(lambda t, x, w: (factor * t * x).astype(w.dtype), scale, tg, params)
        return eps, state, {}

    return PerturbationRule(lambda params: (), perturb)


class VassoState(NamedTuple):
    """VaSSO's exponential moving average ``d`` of the clean gradient, and whether it is set."""

    d: Any
    started: jax.Array


def vasso_perturbation(theta: float = 0.9) -> PerturbationRule:
    """VaSSO (Li & Giannakis, NeurIPS 2023): variance-suppressed perturbation.

    ``d_t = (1 − θ) d_{t−1} + θ g_t`` with ``d_0 = g_0``; ``ε = ρ d_t / ‖d_t‖``. θ = 1 is SAM.
    Reports ``d_norm`` (‖d_t‖). ``d`` is kept in at least float32 whatever the params' dtype.
    A traced θ (``optax.inject_hyperparams``) is clamped to [0, 1] at run time.
    """
    check_constant("theta", theta)
    check_scalar_or_schedule("theta", theta, 0.0, 1.0, open_low=True)

    def init(params):
        d = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), compute_dtype(w)), params)
        return VassoState(d=d, started=jnp.zeros([], jnp.bool_))

    def perturb(g, params, state, rho):
        theta_t = jnp.clip(theta, 0.0, 1.0)

        def ema(d, x):
            x = x.astype(d.dtype)
            return jnp.where(state.started, (1.0 - theta_t) * d + theta_t * x, x)

        d = jax.tree.map(ema, state.d, g)
        eps, eps_norm = _normalized(d, rho)
        eps = jax.tree.map(lambda e, w: e.astype(w.dtype), eps, params)
        diag = {"d_norm": tree_norm(d), "perturbation_norm": eps_norm}
        return eps, VassoState(d=d, started=jnp.ones([], jnp.bool_)), diag

    return PerturbationRule(init, perturb, diagnostics=("d_norm",))


class FriendlyState(NamedTuple):
    """F-SAM's moving average ``m`` of the clean gradient, and whether it is set."""

    m: Any
    started: jax.Array


FRIENDLY_READINGS = ("paper", "code")


def friendly_perturbation(
    sigma: float = 1.0, lmbda: float = 0.9, reading: str = "paper"
) -> PerturbationRule:
    """Friendly-SAM (F-SAM; Li, Zhou, He, Cheng & Huang, CVPR 2024): perturb along the
    stochastic gradient noise, with the full-gradient component (estimated by a moving average
    of past gradients) removed.

    ``reading="paper"`` (default, the paper's equations)::

        m_t = λ m_{t−1} + (1 − λ) g_t   (m_{−1} = 0),   d_t = g_t − σ m_t,   ε = ρ d_t/‖d_t‖

    ``reading="code"`` (the authors' code, nblt/F-SAM ``FriendlySAM``, which differs): ``m_0 =
    g_0`` and ``d_0 = g_0``; afterwards ``d_t = g_t − σ m_{t−1}`` (the average *before* this
    gradient), then ``m_t = λ m_{t−1} + (1 − λ) g_t``. Both take SAM's step at t = 0 and are
    SAM for σ = 0; with λ = 0 the paper's reading is SAM for σ < 1 (``d = (1 − σ) g``) and the
    code's is ``d_t = g_t − σ g_{t−1}``. Defaults σ = 1, λ = 0.9 (the code's ``FriendlySAM``
    class; its ``train.py`` defaults to λ = 0.95 and its ``run.sh`` runs λ = 0.6 at ρ = 0.2).
    Reports ``m_norm`` (‖m_t‖).
    """
    check_constant("sigma", sigma)
    check_constant("lmbda", lmbda)
    check_scalar_or_schedule("sigma", sigma, 0.0, 1.0)
    check_scalar_or_schedule("lmbda", lmbda, 0.0, 1.0)
    if reading not in FRIENDLY_READINGS:
        raise ValueError(f"reading must be one of {FRIENDLY_READINGS}, got {reading!r}.")

    def init(params):
        m = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), compute_dtype(w)), params)
        return FriendlyState(m=m, started=jnp.zeros([], jnp.bool_))

    def perturb(g, params, state, rho):
        sigma_t, lmbda_t = jnp.clip(sigma, 0.0, 1.0), jnp.clip(lmbda, 0.0, 1.0)
        g = jax.tree.map(lambda x, m: x.astype(m.dtype), g, state.m)
        if reading == "paper":
            m = jax.tree.map(lambda m, x: lmbda_t * m + (1.0 - lmbda_t) * x, state.m, g)
            d = jax.tree.map(lambda x, m: x - sigma_t * m, g, m)
        else:
            m = jax.tree.map(
                lambda m, x: jnp.where(state.started, lmbda_t * m + (1.0 - lmbda_t) * x, x),
                state.m,
                g,
            )
            d = jax.tree.map(lambda x, m: jnp.where(state.started, x - sigma_t * m, x), g, state.m)
        eps, eps_norm = _normalized(d, rho)
        eps = jax.tree.map(lambda e, w: e.astype(w.dtype), eps, params)
        diag = {"m_norm": tree_norm(m), "perturbation_norm": eps_norm}
        return eps, FriendlyState(m=m, started=jnp.ones([], jnp.bool_)), diag

    return PerturbationRule(init, perturb, diagnostics=("m_norm",))
