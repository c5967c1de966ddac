"""SAMPa (Xie, Pethick & Cevher, *SAMPa: Sharpness-aware Minimization Parallelized*,
NeurIPS 2024): SAM whose two gradients do not depend on each other.

SAM's second gradient needs ε, which needs the first gradient: two sequential passes. SAMPa
takes ε from the gradient at an auxiliary point ``y_t`` computed in the previous step::

    x̃_t     = x_t + ρ ∇f(y_t) / ‖∇f(y_t)‖
    y_{t+1} = x_t − η_t ∇f(y_t)                                  (y_0 = x_0)
    x_{t+1} = x_t − η_t [(1 − λ) ∇f(x̃_t) + λ ∇f(y_{t+1})]

``∇f(x̃_t)`` and ``∇f(y_{t+1})`` both depend only on ``x_t`` and ``∇f(y_t)``, so they can be
computed at the same time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpjax.core import (
    NORM_EPS,
    ScalarOrSchedule,
    _check_grad_fn,
    _check_same_structure,
    _initial_diagnostics,
    check_float_params,
    check_scalar_or_schedule,
    compute_dtype,
    evaluate,
    tree_norm,
    tree_vdot,
)

__all__ = ["SampaState", "sampa"]

EXECUTIONS = ("sequential", "vmap")


class SampaState(NamedTuple):
    """The step count, ``∇f(y_t)`` (kept for the next step's ε), whether it is set, and the
    last step's diagnostics."""

    count: jax.Array
    y_grad: Any
    started: jax.Array
    diagnostics: dict[str, jax.Array]


def sampa(
    learning_rate: ScalarOrSchedule,
    rho: ScalarOrSchedule = 0.05,
    lam: float = 0.2,
    *,
    execution: str = "sequential",
) -> optax.GradientTransformationExtraArgs:
    """SAMPa (Xie et al., NeurIPS 2024): the equations in this module's docstring.

    The output is ``(1 − λ) ∇f(x̃_t) + λ ∇f(y_{t+1})``; chain the base optimizer after it.
    ``learning_rate`` is η_t of ``y_{t+1} = x_t − η_t ∇f(y_t)``: pass the base optimizer's
    learning rate (float or the same schedule). With plain SGD at that rate the iterates are the
    paper's; with momentum or Adam, the auxiliary point still takes the plain gradient step of
    the equations (the paper states SAMPa for gradient descent).

    ``tx.update(grads, state, params, grad_fn=grad_fn)``: SAMPa never reads ``grads`` (only
    their structure), so under ``jax.jit`` a clean gradient computed only for it is dead code
    and XLA drops it: a step costs two gradients, ∇f(x̃_t) and ∇f(y_{t+1}) on the step's batch
    (plus ∇f(y_0) = ∇f(x_0) once, at step 0, under ``lax.cond``). Memory: ∇f(y_t) is kept
    between steps (one parameter copy more than SAM).

    Execution: ``"sequential"`` (default) computes the two gradients one after the other on
    one device: correct, SAM's time. ``"vmap"`` stacks the two points and calls ``grad_fn``
    once under ``jax.vmap``: the same numbers, one program that evaluates both (twice the
    activation memory). Running them at once, as the paper intends, needs two device groups:
    shard that stacked axis of size 2 over a mesh axis of two groups (each group holding a
    copy of the params and the batch), so that each group computes one gradient, and gather
    the two results (one all-gather of a gradient) before the combination; that gives about
    SGD's wall clock on twice the devices. That sharded layout is not implemented here.

    Defaults: λ = 0.2 (the paper's SAMPa-0.2), ρ = 0.05 (SAM's; tune as for SAM). λ = 0 is
    plain SAMPa; ρ = 0 with λ = 0 is the base optimizer. Diagnostics: ``grad_norm`` (‖∇f(y_t)‖),
    ``second_grad_norm`` (‖∇f(x̃_t)‖), ``y_grad_norm`` (‖∇f(y_{t+1})‖), ``cosine`` (between
    ∇f(y_t) and ∇f(x̃_t), free: both are alive), ``rho``.
    """
    check_scalar_or_schedule("learning_rate", learning_rate, 0.0)
    check_scalar_or_schedule("rho", rho, 0.0)
    if callable(lam):
        raise TypeError("lam must be a number in [0, 1], not a schedule.")
    check_scalar_or_schedule("lam", lam, 0.0, 1.0)
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}.")
    names = ("grad_norm", "second_grad_norm", "y_grad_norm", "cosine", "rho")

    def init_fn(params):
        check_float_params(params)
        return SampaState(
            count=jnp.zeros([], jnp.int32),
            y_grad=jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), compute_dtype(w)), params),
            started=jnp.zeros([], jnp.bool_),
            diagnostics=_initial_diagnostics(names),
        )

    def update_fn(
        updates, state, params=None, *, grad_fn=None, value_and_grad_fn=None, loss=None, **extra
    ):
        del loss, extra  # the clean loss and a planned decision (a policy's) are not used
        if params is None:
            raise ValueError("sampa needs params: tx.update(g, state, params, grad_fn=...).")
        second_pass = _check_grad_fn(grad_fn, value_and_grad_fn)

        def gradient(p):
            g = second_pass(p)[1]
            _check_same_structure("grad_fn(params)", params, g)
            return jax.tree.map(lambda x, y: x.astype(y.dtype), g, state.y_grad)

        # y_0 = x_0: the first step needs ∇f(x_0), computed only then.
        y_grad = jax.lax.cond(state.started, lambda: state.y_grad, lambda: gradient(params))
        rho_t = evaluate(rho, state.count, 0.0)
        lr_t = evaluate(learning_rate, state.count, 0.0)
        y_norm = tree_norm(y_grad)
        factor = rho_t / (y_norm + NORM_EPS)

        def moved(scale):
            return jax.tree.map(
                lambda w, d: (w.astype(d.dtype) + scale * d).astype(w.dtype), params, y_grad
            )

        perturbed, y_next = moved(factor), moved(-lr_t)
        if execution == "vmap":
            stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), perturbed, y_next)
            both = jax.vmap(gradient)(stacked)
            g_tilde = jax.tree.map(lambda x: x[0], both)
            g_y = jax.tree.map(lambda x: x[1], both)
        else:
            g_tilde, g_y = gradient(perturbed), gradient(y_next)
        out = jax.tree.map(
            lambda a, b, u: ((1.0 - lam) * a + lam * b).astype(u.dtype), g_tilde, g_y, updates
        )
        g_tilde_norm = tree_norm(g_tilde)
        diag = {
            "grad_norm": y_norm,
            "second_grad_norm": g_tilde_norm,
            # SAM's cosine between the gradient that set ε and the one taken at w + ε
            "cosine": tree_vdot(y_grad, g_tilde) / (y_norm * g_tilde_norm + NORM_EPS),
            "y_grad_norm": tree_norm(g_y),
            "rho": rho_t,
        }
        diag = {k: jnp.asarray(v, jnp.float32) for k, v in diag.items()}
        new = SampaState(optax.safe_increment(state.count), g_y, jnp.ones([], jnp.bool_), diag)
        return out, new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
