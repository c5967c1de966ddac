"""Drop-in mode: any sharpjax chain behind the plain ``tx.update(grads, state, params)``.

Every sharpjax transformation needs the second gradient ``g₂ = ∇L(w + ε)``, which it gets
from ``grad_fn`` in ``update``. A training loop that cannot pass it (flax's stock
``TrainState.apply_gradients``, a trainer you do not own) can still run it with
:func:`drop_in`, which splits each sharpness-aware step into two ``update`` calls, the way
optax.contrib.sam's default mode does::

    call 1 (ascent),  grads = ∇L(w):      returns ε                 (moves w to w + ε)
    call 2 (descent), grads = ∇L(w + ε):  returns −ε + chain(g, g₂)  (back to w, then the step)

Each call is an ordinary optax update on the gradient at the params the loop holds. Cost:
two ``update`` calls and two gradient evaluations per sharpness-aware step, as in the
``grad_fn`` form; the state keeps ``g`` and ``ε`` between the two calls (two parameter copies).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpjax.core import AscentProbe, _is_concrete, find_states

__all__ = ["DropInState", "drop_in"]


class DropInState(NamedTuple):
    """State of :func:`drop_in`.

    Attributes:
      inner: the wrapped chain's state. It moves once per sharpness-aware step (on the
        descent, or on a step the policy skips), so its step counts and schedules count
        sharpness-aware steps, as in the ``grad_fn`` form.
      ascended: True after an ascent: the params the loop holds are ``w + ε`` and the next
        call descends.
      clean: the clean gradient ``g`` of the ascent, for the descent (zeros otherwise).
      eps: the ``ε`` of the ascent, to step back from ``w + ε`` (zeros otherwise).
    """

    inner: Any
    ascended: jax.Array
    clean: Any
    eps: Any


_NO_GRAD_FN = (
    "sharpjax.drop_in(tx) takes no `{name}`: it gets the second gradient from the next call "
    "of update (tx.update(grads, state, params), grads the gradient at the params you hold). "
    "To pass `{name}` yourself, use the chain without drop_in: "
    "tx.update(grads, state, params, {name}=...)."
)


def drop_in(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs a sharpjax chain with plain ``update(grads, state, params)`` calls, alternating.

    ``tx`` is a chain holding one sharpjax transformation (any rule, combination and policy)
    and its base optimizer, e.g.
    ``sharpjax.drop_in(optax.chain(sharpjax.sam(0.05), optax.sgd(0.1, momentum=0.9)))``.
    Successive calls alternate:

    * ascent, at ``w`` with ``grads = ∇L(w)``: returns ``ε`` (so that ``apply_updates`` moves
      the params to ``w + ε``) and keeps ``g`` and ``ε``. Nothing else moves.
    * descent, at ``w + ε`` with ``grads = g₂ = ∇L(w + ε)``: runs the chain once, exactly as
      ``tx.update(g, state, w, grad_fn=lambda p: g₂)`` would (rule state, combination, base
      optimizer and its momentum, diagnostics), and returns ``−ε + out``, so the params go
      back to ``w`` and take the step from there (``w`` is recomputed as ``(w + ε) − ε``: a
      rounding of the params' precision, not a bitwise ``w``).
    * a step the policy skips (LookSAM, RST, AE-SAM decide at the ascent): that call runs the
      chain's step without g₂ itself and returns its update; the next call is an ascent again.
      A skipped step costs one call and one gradient.

    What the loop sees: two ``update`` calls (and two gradients) per sharpness-aware step, so
    a counter outside (flax ``TrainState.step``, ``optax.apply_if_finite``) advances twice per
    step (once on a skipped one). The wrapped chain's own counts (ρ and learning-rate
    schedules inside ``tx``) advance once per step, as in the ``grad_fn`` form; a schedule
    outside ``drop_in`` counts calls. The gradients of the two calls are taken on whatever
    batch the loop gives each call: the same batch twice is SAM exactly; successive batches
    (optax.contrib.sam's usage) take ``g₂`` on the next batch.

    ``ε`` from a non-finite ``g`` or ρ is not applied (the ascent returns zeros) and the
    descent's update zeroes its output and counts it (``nonfinite_second_gradients``), as the
    ``grad_fn`` form does. Put ``optax.apply_if_finite`` outside ``drop_in``, not inside: a
    wrapper inside sees the ascent's probe state. Not with ``num_microbatches`` (one
    ``w + ε`` for the params) nor with ``esam`` (its data selection needs the losses).

    Args:
      tx: the chain (or a single sharpjax transformation) to run; exactly one sharpjax
        transformation in it.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with the state :class:`DropInState`;
      ``sharpjax.diagnostics`` reads it as it reads the chain's.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return DropInState(tx.init(params), jnp.zeros([], jnp.bool_), zeros, zeros)

    def update_fn(updates, state, params=None, **extra):
        for name in ("grad_fn", "value_and_grad_fn"):
            if name in extra:
                raise TypeError(_NO_GRAD_FN.format(name=name))
        if params is None:
            raise ValueError("sharpjax.drop_in needs params: tx.update(grads, state, params).")
        zeros_g = jax.tree.map(jnp.zeros_like, state.clean)
        zeros_eps = jax.tree.map(jnp.zeros_like, state.eps)
        rest = DropInState(state.inner, jnp.bool_(False), zeros_g, zeros_eps)

        def step_without_second():
            # The chain decides again, from the same g and state: it skips g₂ here too.
            never = lambda p: jax.tree.map(jnp.zeros_like, p)  # traced, never run
            out, inner = tx.update(updates, state.inner, params, grad_fn=never, **extra)
            return out, rest._replace(inner=inner)

        def ascend():
            _, probed = tx.update(updates, state.inner, params, drop_in_ascent=True, **extra)
            probes = find_states(probed, lambda n: isinstance(n, AscentProbe))
            if len(probes) != 1:
                raise ValueError(
                    "sharpjax.drop_in needs exactly one sharpjax transformation in the chain "
                    f"(one with a second gradient), found {len(probes)}."
                )
            eps, take = probes[0].eps, probes[0].take
            eps_update = jax.tree.map(lambda e, w: e.astype(w.dtype), eps, params)
            clean = jax.tree.map(lambda u, c: u.astype(c.dtype), updates, state.clean)
            eps = jax.tree.map(lambda e, c: e.astype(c.dtype), eps, state.eps)
            up = (eps_update, DropInState(state.inner, jnp.bool_(True), clean, eps))
            if _is_concrete(take) and bool(take):  # no policy: always a second gradient
                return up
            return jax.lax.cond(take, lambda: up, step_without_second)

        def descend():
            w = jax.tree.map(
                lambda p, e: (p - e.astype(p.dtype)).astype(p.dtype), params, state.eps
            )
            second = lambda p: updates
            out, inner = tx.update(state.clean, state.inner, w, grad_fn=second, **extra)
            out = jax.tree.map(
                lambda o, e, p: (o - e.astype(o.dtype)).astype(p.dtype), out, state.eps, params
            )
            return out, rest._replace(inner=inner)

        if _is_concrete(state.ascended):  # eager: run only the branch that is due
            return descend() if bool(state.ascended) else ascend()
        return jax.lax.cond(state.ascended, descend, ascend)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
