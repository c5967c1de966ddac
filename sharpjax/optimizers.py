"""One-line constructors of the sharpness-aware transformations.

Each returns an ``optax.GradientTransformationExtraArgs`` that goes into ``optax.chain``
before any base optimizer and needs ``grad_fn`` in ``update``::

    tx = optax.chain(sharpjax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

Every constructor but :func:`msam` also takes the data-parallel arguments of
:func:`sharpjax.core.sharpness_aware` (``axis_name``, ``perturbation_mode``, ``group_size``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sharpjax.combinations import gsam_combination, saner_combination
from sharpjax.core import (
    CORE_DIAGNOSTICS,
    PerturbationRule,
    ScalarOrSchedule,
    SharpnessAwareState,
    _check_grad_fn,
    _check_same_structure,
    check_scalar_or_schedule,
    evaluate,
    sharpness_aware,
    tree_add,
    tree_norm,
    tree_vdot,
)
from sharpjax.perturbations import adaptive_perturbation, sam_perturbation, vasso_perturbation


def sam(rho: ScalarOrSchedule = 0.05, **parallel: Any) -> optax.GradientTransformationExtraArgs:
    """SAM (Foret et al., ICLR 2021): ``ε = ρ g/‖g‖``, output ``∇L(w + ε)``. Default ρ = 0.05."""
    return sharpness_aware(sam_perturbation(), rho=rho, **parallel)


def asam(
    rho: ScalarOrSchedule = 0.5, eta: float = 0.01, **parallel: Any
) -> optax.GradientTransformationExtraArgs:
    """ASAM (Kwon et al., ICML 2021): ``ε = ρ T² g / ‖T g‖``, ``T = |w| + η``.

    Defaults ρ = 0.5, η = 0.01 (the paper's values with SGD).
    """
    return sharpness_aware(adaptive_perturbation(eta), rho=rho, **parallel)


def vasso(
    rho: ScalarOrSchedule = 0.1, theta: float = 0.9, **parallel: Any
) -> optax.GradientTransformationExtraArgs:
    """VaSSO (Li & Giannakis, NeurIPS 2023): variance-suppressed sharpness-aware optimization.

    ``d_t = (1 − θ) d_{t−1} + θ g_t`` (``d_0 = g_0``), ``ε = ρ d_t/‖d_t‖``, output ``∇L(w + ε)``.
    Defaults θ = 0.9 and ρ = 0.1 (the paper uses 0.05 to 0.2). θ = 1 is SAM. The diagnostics
    carry ``d_norm``. In per-device mode each device keeps its own ``d``.
    """
    return sharpness_aware(vasso_perturbation(theta), rho=rho, **parallel)


def saner_warmup(alpha: float = 0.5, warmup_steps: int = 1) -> optax.Schedule:
    """SANER's α schedule: linear from 1 (SAM) to ``alpha`` over ``warmup_steps`` steps.

    The paper warms up over the first 50 of 200 epochs: ``warmup_steps = 50 * steps_per_epoch``.
    """
    check_scalar_or_schedule("alpha", alpha, 0.0, 1.0, open_low=True)
    if not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be a positive int, got {warmup_steps!r}.")
    return optax.linear_schedule(1.0, alpha, warmup_steps)


def saner(
    rho: ScalarOrSchedule = 0.1,
    alpha: ScalarOrSchedule = 0.5,
    perturbation: PerturbationRule | None = None,
    **parallel: Any,
) -> optax.GradientTransformationExtraArgs:
    """SANER (Sharpness-Aware Noise-Explicit Reweighting, arXiv 2411.17132).

    ``m = 1[0 < g₂/(g + 1e-8) < 1]``, output ``g₂ ⊙ (α m + (1 − m))`` with ``g₂ = ∇L(w + ε)``.
    Defaults (the paper's): ρ = 0.1, α = 0.5, reached in the paper by a linear warm-up from 1
    over the first 50 of 200 epochs (``alpha=sharpjax.saner_warmup(0.5, steps)``). α = 1 is SAM.

    Args:
      rho: perturbation radius, float or schedule.
      alpha: multiplier on the masked elements, in (0, 1], float or schedule.
      perturbation: any perturbation rule; default SAM's. SANER on VaSSO is
        ``saner(rho, alpha, perturbation=sharpjax.vasso_perturbation(0.9))``, SANER on ASAM
        ``saner(rho, alpha, perturbation=sharpjax.adaptive_perturbation(0.01))``.
    """
    return sharpness_aware(
        perturbation or sam_perturbation(), saner_combination(alpha), rho=rho, **parallel
    )


def gsam(
    rho: ScalarOrSchedule = 0.05,
    alpha: float = 0.1,
    perturbation: PerturbationRule | None = None,
    **parallel: Any,
) -> optax.GradientTransformationExtraArgs:
    """GSAM (Zhuang et al., ICLR 2022): surrogate-gap guided sharpness-aware minimization.

    ``g_⊥ = g − (g·ĝ₂) ĝ₂``, output ``g₂ − α g_⊥``; α = 0 is SAM. In the paper ρ follows the
    learning-rate schedule: pass an optax schedule as ``rho`` (e.g. ``lambda t: rho_max *
    lr_schedule(t) / lr_max``). Default α = 0.1 (one of the paper's values; it tunes 0.01 to 0.3).
    """
    return sharpness_aware(
        perturbation or sam_perturbation(), gsam_combination(alpha), rho=rho, **parallel
    )


def split_microbatches(
    batch: Any, num_microbatches: int, *, argument: str = "num_microbatches"
) -> Any:
    """Reshapes every array of a batch from ``(B, ...)`` to ``(m, B/m, ...)`` for :func:`msam`.

    ``argument`` names the count in error messages (``sharpjax.parallel`` calls it
    ``num_micro_steps``).
    """
    _check_count(argument, num_microbatches)

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"{argument}={num_microbatches} does not divide the batch size "
                f"{x.shape[0]}; choose a divisor of the batch size."
            )
        return x.reshape((num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:]))

    return jax.tree.map(split, batch)


def microbatch_value_and_grad(
    loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any, num_microbatches: int
) -> tuple[jax.Array, Any, Callable[[Any, int], Any]]:
    """What :func:`msam` needs: per-micro-batch losses, stacked gradients, and ``grad_fn``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a (micro-)batch.
      params: the parameters.
      batch: a pytree of arrays with the batch on axis 0.
      num_microbatches: m, which must divide the batch size.

    Returns:
      ``(losses, grads, grad_fn)``: losses of shape (m,), gradients stacked on axis 0, and
      ``grad_fn(params, j)``. Unrolled over micro-batches, like msam itself.
    """
    micro = split_microbatches(batch, num_microbatches)
    pick = lambda j: jax.tree.map(lambda a: a[j], micro)
    results = [jax.value_and_grad(loss_fn)(params, pick(j)) for j in range(num_microbatches)]
    losses = jnp.stack([loss for loss, _ in results])
    grads = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[g for _, g in results])
    return losses, grads, lambda p, j: jax.grad(loss_fn)(p, pick(j))


def _check_count(argument: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be an int >= 1, got {value!r}.")


def msam(
    rho: ScalarOrSchedule = 0.05, num_microbatches: int = 1
) -> optax.GradientTransformationExtraArgs:
    """mSAM / m-sharpness on one device (Foret et al. §4; Behdin et al. 2023).

    The batch is split into m micro-batches ``B_j``; ``ε_j = ρ g_j/‖g_j‖`` per micro-batch and
    the output is ``mean_j ∇L_{B_j}(w + ε_j)``. m = 1 is SAM.

    Contract (different from the other transformations, because each ε_j needs its own
    micro-batch gradient ``g_j``):

    * ``updates``: the clean per-micro-batch gradients stacked on a leading axis of size m,
      e.g. ``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, split_microbatches(batch, m))``;
      their cost is one full-batch gradient.
    * ``grad_fn(params, j)``: the gradient on micro-batch ``j``, a Python int; msam calls it
      once per micro-batch, e.g.
      ``lambda p, j: jax.grad(loss)(p, jax.tree.map(lambda a: a[j], microbatches))``.

    :func:`microbatch_value_and_grad` builds both from ``loss_fn(params, batch)``.
    Two full-batch gradient evaluations in all, like SAM. The output has the params' shape
    (the mean over micro-batches), so the base optimizer chained after it sees a normal gradient.
    """
    check_scalar_or_schedule("rho", rho, 0.0)
    _check_count("num_microbatches", num_microbatches)
    rule = sam_perturbation()

    def init_fn(params):
        del params
        zero = jnp.zeros([], jnp.float32)
        return SharpnessAwareState(
            jnp.zeros([], jnp.int32), (), (), dict.fromkeys(CORE_DIAGNOSTICS, zero)
        )

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del extra_args
        grad_fn = _check_grad_fn(grad_fn)
        for leaf, ref in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
            if leaf.shape != (num_microbatches, *ref.shape):
                raise ValueError(
                    f"msam(num_microbatches={num_microbatches}) expects the clean gradients of "
                    f"the micro-batches stacked on axis 0, shape (m, *param.shape) = "
                    f"{(num_microbatches, *ref.shape)}; got {leaf.shape}. See "
                    "sharpjax.split_microbatches and the msam docstring."
                )
        rho_t = evaluate(rho, state.count)
        eps = jax.vmap(lambda g: rule.perturb(g, params, (), rho_t)[0])(updates)
        # Unrolled over micro-batches: each has its own parameters, and both a lax.map and a
        # vmap over parameters run 2-15x slower on XLA:CPU (grouped convolutions, while loops).
        second = [
            grad_fn(tree_add(params, jax.tree.map(lambda e, j=j: e[j], eps)), j)
            for j in range(num_microbatches)
        ]
        g2 = jax.tree.map(lambda *leaves: jnp.stack(leaves), *second)
        _check_same_structure("grad_fn(params + ε_j, j)", updates, g2)
        out = jax.tree.map(
            lambda x, w: jnp.mean(x.astype(jnp.float32), 0).astype(w.dtype), g2, params
        )
        g = jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32), 0), updates)
        grad_norm, out_norm = tree_norm(g), tree_norm(out)
        diagnostics = {
            "grad_norm": grad_norm,
            # the mean norm of the per-micro-batch perturbations (each is ρ unless g_j = 0)
            "perturbation_norm": jnp.mean(jax.vmap(tree_norm)(eps)),
            "second_grad_norm": out_norm,
            "cosine": tree_vdot(g, out) / (grad_norm * out_norm + 1e-12),
            "rho": rho_t,
        }
        new_state = SharpnessAwareState(optax.safe_increment(state.count), (), (), diagnostics)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def noise_resistant_sam(
    rho: ScalarOrSchedule = 0.05, mu: float = 0.01, **parallel: Any
) -> optax.GradientTransformationExtraArgs:
    """Noise-resistant SAM (Su, Jin & Wang, Neural Networks 181, 2024), in one call.

    ``optax.chain(sam(rho), noise_resistant(mu))``: chain a base optimizer after it. See
    :func:`sharpjax.noise_resistant` for the rule and what is (not) verified about it.
    """
    from sharpjax.feedback import noise_resistant

    return optax.chain(sam(rho, **parallel), noise_resistant(mu))
