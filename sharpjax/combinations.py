"""Combination rules: what to do with the clean gradient ``g`` and the second ``g₂``.

Each rule maps ``(g, g₂)`` to the gradient handed to the next transformation. None of them
takes another gradient. Equations and sources: the project's docs/algorithms.md.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sharpjax.core import (
    NORM_EPS,
    CombinationRule,
    ScalarOrSchedule,
    check_scalar_or_schedule,
    compute_dtype,
    evaluate,
    tree_norm,
    tree_vdot,
)

# SANER's ratio g₂ / (g + SANER_EPS), as in the paper's code.
SANER_EPS = 1e-8


def saner_mask(g: jax.Array, g2: jax.Array) -> jax.Array:
    """SANER's mask ``1[0 < g₂/(g + 1e-8) < 1]``: same sign as g and smaller in magnitude."""
    dtype = jnp.result_type(compute_dtype(g), compute_dtype(g2))
    ratio = g2.astype(dtype) / (g.astype(dtype) + SANER_EPS)
    return (ratio > 0) & (ratio < 1)


class SanerState(NamedTuple):
    """Kept empty: SANER's diagnostics (``masked_fraction``, ``alpha``) ride in the core's."""


def saner_combination(alpha: ScalarOrSchedule = 0.5) -> CombinationRule:
    """SANER (arXiv 2411.17132): down-weight elements where noisy-label gradients dominate.

    ``m = 1[0 < g₂ / (g + 1e-8) < 1]``; output ``g₂ ⊙ (α m + (1 − m))``, with ``0 < α ≤ 1`` the
    multiplier on masked elements, a float or a schedule of the step count (α = 1 is SAM;
    see :func:`sharpjax.saner_warmup`). Reports ``masked_fraction`` and ``alpha`` (the value
    used: a schedule or injected value outside [0, 1] is clamped into it).
    """
    check_scalar_or_schedule("alpha", alpha, 0.0, 1.0, open_low=True)

    def combine(g, g2, state, count):
        alpha_t = evaluate(alpha, count, 0.0, 1.0)
        masks = jax.tree.map(saner_mask, g, g2)
        out = jax.tree.map(
            lambda x, m: (x.astype(compute_dtype(x)) * jnp.where(m, alpha_t, 1.0)).astype(x.dtype),
            g2,
            masks,
        )
        masked = sum(jnp.sum(m) for m in jax.tree.leaves(masks))
        total = sum(m.size for m in jax.tree.leaves(masks))
        diag = {"masked_fraction": masked / max(total, 1), "alpha": alpha_t}
        return out, state, diag

    return CombinationRule(lambda params: SanerState(), combine, ("masked_fraction", "alpha"))


def gsam_combination(alpha: ScalarOrSchedule = 0.1) -> CombinationRule:
    """GSAM (Zhuang et al., ICLR 2022): surrogate-gap guided SAM.

    ``g_⊥ = g − (g·ĝ₂) ĝ₂`` (the part of g orthogonal to g₂); output ``g₂ − α g_⊥``.
    α = 0 is SAM; α is a float ≥ 0 or a schedule (clamped to ≥ 0 at run time). Reports
    ``orthogonal_norm``, ‖g_⊥‖, and ``surrogate_gap`` ``h = L(w + ε) − L(w)``, which the core
    fills in when ``update`` gets the losses (the cosine of g with g₂ is the core's ``cosine``).
    """
    check_scalar_or_schedule("alpha", alpha, 0.0)

    def combine(g, g2, state, count):
        alpha_t = evaluate(alpha, count, 0.0)
        g2_norm = tree_norm(g2)
        projection = tree_vdot(g, g2) / (g2_norm * g2_norm + NORM_EPS)
        orthogonal = jax.tree.map(
            lambda x, y: x.astype(compute_dtype(x)) - projection * y.astype(compute_dtype(x)), g, g2
        )
        out = jax.tree.map(
            lambda y, o: (y.astype(o.dtype) - alpha_t * o).astype(y.dtype), g2, orthogonal
        )
        # surrogate_gap needs the losses, which only the core sees: it overwrites this NaN.
        diag = {"orthogonal_norm": tree_norm(orthogonal), "surrogate_gap": jnp.float32(jnp.nan)}
        return out, state, diag

    return CombinationRule(lambda params: (), combine, ("orthogonal_norm", "surrogate_gap"))


def wsam_combination(gamma: float = 0.9) -> CombinationRule:
    """WSAM (Yue et al., *Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term*, KDD 2023), coupled form: the gradient of
    ``L(w) + γ/(1 − γ) [L(w + ε) − L(w)]``, i.e. ``g + γ/(1 − γ) (g₂ − g)``.

    ``0 ≤ γ < 1``: γ = 0 is the base optimizer, γ = 1/2 is SAM. Reports ``sharpness_weight``
    (γ/(1 − γ)). The decoupled form of the authors' code is :func:`sharpjax.wsam` with
    ``base_optimizer``.
    """
    check_wsam_gamma(gamma)

    def combine(g, g2, state, count):
        del count
        gamma_t = jnp.clip(gamma, 0.0, 1.0 - 1e-6)  # a traced γ is clamped into [0, 1)
        weight = gamma_t / (1.0 - gamma_t)
        out = jax.tree.map(
            lambda x, y: (
                x.astype(compute_dtype(x)) + weight * (y.astype(compute_dtype(x)) - x)
            ).astype(x.dtype),
            g,
            g2,
        )
        return out, state, {"sharpness_weight": weight}

    return CombinationRule(lambda params: (), combine, ("sharpness_weight",))


def check_wsam_gamma(gamma: float) -> None:
    """γ of WSAM must be a number in [0, 1) (γ = 1 would weigh the sharpness infinitely)."""
    if callable(gamma):
        raise TypeError("gamma must be a number in [0, 1), not a schedule.")
    check_scalar_or_schedule("gamma", gamma, 0.0, 1.0)
    try:
        one = float(gamma) >= 1.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced (inject_hyperparams): clamped at run time
    if one:
        raise ValueError(
            "gamma must lie in [0, 1): the sharpness weight γ/(1 − γ) is infinite at γ = 1; "
            "γ = 0.5 is SAM, the authors' default is 0.9."
        )
