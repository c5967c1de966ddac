"""Lookbehind-SAM (Mordido, Malviya, Baratin & Chandar, *Lookbehind-SAM: k steps back, 1 step
forward*, ICML 2024).

``k`` ascent steps that accumulate the perturbation, each followed by a descent step of the
base optimizer on fast weights, then a Lookahead-style interpolation of the slow weights::

    φ'_0 = φ_0 = w                                  (w: the slow weights, the params)
    for i = 1 … k:
        ε_i  = ρ ∇L(φ'_{i−1}) / ‖∇L(φ'_{i−1})‖      (ascent from the last ascent point)
        φ'_i = φ'_{i−1} + ε_i
        φ_i  = φ_{i−1} + base(∇L(φ'_i))             (descent of the fast weights)
    w ← w + α (φ_k − w)

It needs the base optimizer inside (the fast weights step with it), so it is a whole optimizer,
not a transformation chained before one. With k = 1 and α = 1 it is SAM with that base
optimizer.

Checked against the paper and the authors' code (chandar-lab/Lookbehind-SAM,
``LookbehindSAM``): the same equations; the base optimizer's state (momentum) runs on across
steps and the fast weights restart at the new slow weights. The code computes the gradient at
each ascent point twice (once to descend, once to ascend from it: 2k gradients per step);
here it is taken once and used for both (k + 1), the same numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpjax.core import (
    PerturbationRule,
    ScalarOrSchedule,
    _check_grad_fn,
    _check_same_structure,
    _initial_diagnostics,
    check_float_params,
    check_scalar_or_schedule,
    compute_dtype,
    evaluate,
    tree_add,
    tree_norm,
)
from sharpjax.perturbations import sam_perturbation

__all__ = ["LookbehindState", "lookbehind_sam"]


class LookbehindState(NamedTuple):
    """The outer step count, the base optimizer's state (it steps k times per update), the
    perturbation rule's state and the last step's diagnostics."""

    count: jax.Array
    base: Any
    perturbation: Any
    diagnostics: dict[str, jax.Array]


def lookbehind_sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 2,
    alpha: float = 0.5,
    *,
    perturbation: PerturbationRule | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Lookbehind-SAM (Mordido et al., ICML 2024): the equations in this module's docstring.

    ``tx = sharpjax.lookbehind_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, k=2, alpha=0.5)``
    is the whole optimizer; ``tx.update(grads, state, params, grad_fn=grad_fn)`` takes the
    clean gradient at ``w`` and calls ``grad_fn`` k times, all on the step's batch (the
    paper's default; it also studies switching batches between ascent steps, not offered here).

    Cost, per update: k + 1 gradients (SAM: 2; k = 2: 1.5× SAM), computed one after another;
    the base optimizer steps k times, so its step count and schedules advance k per update
    (a learning-rate schedule must count k steps per Lookbehind step); memory: the ascent point,
    the fast weights and the last gradient beside the params, and XLA keeps about one more
    parameter copy per further ascent step (temporaries beyond SGD's step, XLA's
    memory_analysis on a 2.6 M-parameter MLP: SAM 0.11, k = 1 0.26, k = 2 1.26, k = 5 4.26
    parameter copies).

    Args:
      base_optimizer: the optimizer of the fast weights (``optax.sgd``, ``optax.adamw``, ...).
      rho: the radius of each ascent step (float or schedule of the outer step count).
      k: the number of ascent steps, an int ≥ 1 (k = 1, α = 1 is SAM).
      alpha: the slow-weight step size, in (0, 1] (1: the slow weights jump to the fast).
      perturbation: each ascent's rule (default SAM's; ``adaptive_perturbation(0.01)`` is
        Lookbehind-ASAM, which the paper also runs).

    Defaults k = 2, α = 0.5: within the paper's grids (k ∈ {2, 5, 10}, α ∈ {0.2, 0.5, 0.8});
    its best values depend on the model, tune them. The paper's adaptive α is not implemented.
    Diagnostics: ``grad_norm`` (‖g‖ at w), ``perturbation_norm`` (‖φ'_k − w‖), ``rho``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(
            f"k must be an int >= 1 (the number of ascent steps; k = 1 with alpha = 1 is SAM), "
            f"got {k!r}."
        )
    if callable(alpha):
        raise TypeError("alpha must be a number in (0, 1], not a schedule.")
    check_scalar_or_schedule("alpha", alpha, 0.0, 1.0, open_low=True)
    check_scalar_or_schedule("rho", rho, 0.0)
    if not isinstance(base_optimizer, optax.GradientTransformation):
        raise TypeError(
            "base_optimizer must be an optax.GradientTransformation (the fast weights' "
            f"optimizer, e.g. optax.sgd(0.1, momentum=0.9)), got {type(base_optimizer).__name__}."
        )
    rule = perturbation or sam_perturbation()
    base = optax.with_extra_args_support(base_optimizer)
    names = ("grad_norm", "perturbation_norm", "rho")

    def init_fn(params):
        check_float_params(params)
        return LookbehindState(
            count=jnp.zeros([], jnp.int32),
            base=base.init(params),
            perturbation=rule.init(params),
            diagnostics=_initial_diagnostics(names),
        )

    def update_fn(
        updates, state, params=None, *, grad_fn=None, value_and_grad_fn=None, loss=None, **extra
    ):
        del loss, extra  # the clean loss and a planned decision (a policy's) are not used
        if params is None:
            raise ValueError("lookbehind_sam needs params: tx.update(g, state, params, ...).")
        second_pass = _check_grad_fn(grad_fn, value_and_grad_fn)
        rho_t = evaluate(rho, state.count, 0.0)
        alpha_t = jnp.clip(alpha, 0.0, 1.0)
        grad_norm = tree_norm(updates)  # now, so that g need not live through the loop
        g, ascent, fast = updates, params, params
        base_state, rule_state = state.base, state.perturbation
        # Unrolled: k is small, and a gradient inside a loop is slow on XLA:CPU. The cost: XLA
        # keeps about one more parameter copy per ascent step (memory_analysis of a 2.6 M
        # parameter MLP: 0.26, 1.26, 4.26 copies beyond SGD for k = 1, 2, 5; in a fori_loop
        # 2.05 for any k).
        for _ in range(k):
            eps, rule_state, _ = rule.perturb(g, ascent, rule_state, rho_t)
            ascent = tree_add(ascent, eps)
            _, g = second_pass(ascent)
            _check_same_structure("the second gradient", params, g)
            step, base_state = base.update(g, base_state, fast)
            fast = optax.apply_updates(fast, step)

        def slow_step(f, w):
            dtype = compute_dtype(w)
            return (alpha_t * (f.astype(dtype) - w.astype(dtype))).astype(w.dtype)

        out = jax.tree.map(slow_step, fast, params)
        offset = jax.tree.map(lambda a, w: a - w, ascent, params)
        diag = {
            "grad_norm": grad_norm.astype(jnp.float32),
            "perturbation_norm": tree_norm(offset).astype(jnp.float32),
            "rho": jnp.asarray(rho_t, jnp.float32),
        }
        new = LookbehindState(optax.safe_increment(state.count), base_state, rule_state, diag)
        return out, new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
