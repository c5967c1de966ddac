"""One-line constructors of the sharpness-aware transformations.

Each returns an ``optax.GradientTransformationExtraArgs`` that goes into ``optax.chain``
before any base optimizer and needs ``grad_fn`` in ``update``::

    tx = optax.chain(sharpjax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

Every constructor takes the data-parallel and micro-batch arguments of
:func:`sharpjax.core.sharpness_aware` as keywords (``num_microbatches``,
``microbatch_execution``, ``axis_name``,
``perturbation_mode``, ``group_size``) and, where the perturbation is a rule of
``perturbations.py``, ``groups`` (:func:`sharpjax.param_groups`: what is perturbed, with
which ρ), and works under ``optax.inject_hyperparams`` for its
float hyperparameters (``rho``, ``alpha``, ``theta``, ``eta``, ``mu``)::

    tx = optax.inject_hyperparams(sharpjax.sam)(rho=0.05)
    state.hyperparams["rho"] = 0.1  # takes effect at the next update

The diagnostics' ``cosine`` (between ``g`` and ``g₂``) keeps ``g`` alive through the second
pass. SANER and GSAM read ``g`` anyway and always report it; the constructors whose output is
``g₂`` itself (``sam``, ``asam``, ``vasso``, ``msam``, ``noise_resistant_sam`` and the
efficient ``random_sam``, ``ae_sam``, ``esam``) report it only with ``cosine=True``, at one
parameter copy of memory, and leave the key out otherwise, so that the default step needs no more
memory than a hand-written SAM step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from sharpjax.combinations import (
    check_wsam_gamma,
    gsam_combination,
    saner_combination,
    wsam_combination,
)
from sharpjax.core import (
    PerturbationRule,
    ScalarOrSchedule,
    _check_count,
    check_scalar_or_schedule,
    evaluate,
    sharpness_aware,
)
from sharpjax.groups import ParamGroups, grouped_perturbation
from sharpjax.perturbations import (
    adaptive_perturbation,
    friendly_perturbation,
    sam_perturbation,
    vasso_perturbation,
)


def _grouped(rule: PerturbationRule, groups: ParamGroups | None) -> PerturbationRule:
    """``rule`` restricted to parameter groups (:func:`sharpjax.param_groups`), if any."""
    return rule if groups is None else grouped_perturbation(rule, groups)


def sam(
    rho: ScalarOrSchedule = 0.05,
    *,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    groups: ParamGroups | None = None,
    cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SAM (Foret et al., ICLR 2021): ``ε = ρ g/‖g‖``, output ``∇L(w + ε)``. Default ρ = 0.05."""
    return sharpness_aware(
        _grouped(sam_perturbation(), groups),
        rho=rho,
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
        cosine=cosine or None,  # False: still measured where it is free
    )


def asam(
    rho: ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    groups: ParamGroups | None = None,
    cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """ASAM (Kwon et al., ICML 2021): ``ε = ρ T² g / ‖T g‖``, ``T = |w| + η``.

    Defaults ρ = 0.5, η = 0.01 (the paper's values with SGD).
    """
    return sharpness_aware(
        _grouped(adaptive_perturbation(eta), groups),
        rho=rho,
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
        cosine=cosine or None,  # False: still measured where it is free
    )


def vasso(
    rho: ScalarOrSchedule = 0.1,
    theta: float = 0.9,
    *,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    groups: ParamGroups | None = None,
    cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """VaSSO (Li & Giannakis, NeurIPS 2023): variance-suppressed sharpness-aware optimization.

    ``d_t = (1 − θ) d_{t−1} + θ g_t`` (``d_0 = g_0``), ``ε = ρ d_t/‖d_t‖``, output ``∇L(w + ε)``.
    Defaults θ = 0.9 and ρ = 0.1 (the paper uses 0.05 to 0.2). θ = 1 is SAM. The diagnostics
    carry ``d_norm``. In per-device mode (and with micro-batches) each device (micro-batch)
    keeps its own ``d``.
    """
    return sharpness_aware(
        _grouped(vasso_perturbation(theta), groups),
        rho=rho,
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
        cosine=cosine or None,  # False: still measured where it is free
    )


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
    *,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    groups: ParamGroups | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SANER (Sharpness-Aware Noise-Explicit Reweighting, arXiv 2411.17132).

    ``m = 1[0 < g₂/(g + 1e-8) < 1]``, output ``g₂ ⊙ (α m + (1 − m))`` with ``g₂ = ∇L(w + ε)``.
    Defaults (the paper's): ρ = 0.1, α = 0.5, reached in the paper by a linear warm-up from 1
    over the first 50 of 200 epochs (``alpha=sharpjax.saner_warmup(0.5, steps)``). α = 1 is SAM.

    Args:
      rho: perturbation radius, float or schedule.
      alpha: multiplier on the masked elements, in (0, 1], float or schedule (clamped to
        [0, 1] at run time).
      perturbation: any perturbation rule; default SAM's. SANER on VaSSO is
        ``saner(rho, alpha, perturbation=sharpjax.vasso_perturbation(0.9))``, SANER on ASAM
        ``saner(rho, alpha, perturbation=sharpjax.adaptive_perturbation(0.01))``, SANER on mSAM
        ``saner(rho, alpha, num_microbatches=m)``.
    """
    return sharpness_aware(
        _grouped(perturbation or sam_perturbation(), groups),
        saner_combination(alpha),
        rho=rho,
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
    )


def gsam(
    rho: ScalarOrSchedule = 0.05,
    alpha: float = 0.1,
    perturbation: PerturbationRule | None = None,
    *,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    groups: ParamGroups | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GSAM (Zhuang et al., ICLR 2022): surrogate-gap guided sharpness-aware minimization.

    ``g_⊥ = g − (g·ĝ₂) ĝ₂``, output ``g₂ − α g_⊥``; α = 0 is SAM. In the paper ρ follows the
    learning-rate schedule: pass an optax schedule as ``rho`` (e.g. ``lambda t: rho_max *
    lr_schedule(t) / lr_max``). Default α = 0.1 (one of the paper's values; it tunes 0.01 to 0.3).
    The diagnostics carry ``surrogate_gap`` ``h = L(w + ε) − L(w)`` when ``update`` gets
    ``value_and_grad_fn`` and ``loss``, and ``orthogonal_norm`` ‖g_⊥‖.
    """
    return sharpness_aware(
        _grouped(perturbation or sam_perturbation(), groups),
        gsam_combination(alpha),
        rho=rho,
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
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
) -> tuple[jax.Array, Any, Callable[[Any, jax.Array], Any]]:
    """What m-sharpness needs: per-micro-batch losses, stacked gradients, and ``grad_fn``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a (micro-)batch.
      params: the parameters.
      batch: a pytree of arrays with the batch on axis 0.
      num_microbatches: m, which must divide the batch size.

    Returns:
      ``(losses, grads, grad_fn)``: losses of shape (m,), gradients stacked on axis 0, and
      ``grad_fn(params, j)``, the gradient on micro-batch ``j`` (a possibly traced int).
    """
    micro = split_microbatches(batch, num_microbatches)
    losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, micro)
    pick = lambda j: jax.tree.map(lambda a: a[j], micro)
    return losses, grads, lambda p, j: jax.grad(loss_fn)(p, pick(j))


def msam(
    rho: ScalarOrSchedule = 0.05,
    num_microbatches: int = 1,
    *,
    axis_name: str | None = None,
    cosine: bool = False,
    microbatch_execution: str = "sequential",
) -> optax.GradientTransformationExtraArgs:
    """mSAM / m-sharpness (Foret et al. §4; Behdin et al. 2023): SAM with one ε per micro-batch.

    The batch is split into m micro-batches ``B_j``; ``ε_j = ρ g_j/‖g_j‖`` per micro-batch and
    the output is ``mean_j ∇L_{B_j}(w + ε_j)``. m = 1 is SAM. It is
    ``sam(rho, num_microbatches=m)``; every other rule composes with micro-batches the same way
    (``saner(..., num_microbatches=m)``, ``vasso(..., num_microbatches=m)``).

    Contract (each ε_j needs its own micro-batch gradient ``g_j``):

    * ``updates``: the clean per-micro-batch gradients stacked on a leading axis of size m,
      e.g. ``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, split_microbatches(batch, m))``;
      their cost is one full-batch gradient.
    * ``grad_fn(params, j)``: the gradient on micro-batch ``j``, an int32 scalar that may be
      traced (index with ``jax.tree.map(lambda a: a[j], microbatches)``). It is called once
      per micro-batch, one after another under ``lax.scan``, so the step compiles in a time
      that does not grow with m; ``microbatch_execution="parallel"`` runs them all at once
      under ``jax.vmap`` instead (see :func:`sharpjax.core.sharpness_aware`).

    :func:`microbatch_value_and_grad` builds both from ``loss_fn(params, batch)``.
    Two full-batch gradient evaluations in all, like SAM. The output has the params' shape
    (the mean over micro-batches), so the base optimizer chained after it sees a normal gradient.
    Under ``optax.inject_hyperparams`` pass ``static_args=("num_microbatches",)``.

    At SAM's memory: pass ``updates=None`` and the clean gradients are taken inside the step,
    ``grad_fn(params, j)`` at ``w`` then at ``w + ε_j``, one micro-batch at a time
    (``value_and_grad_fn(params, j)`` also gives the clean loss, the mean of the m)::

        updates, state = tx.update(None, state, params, value_and_grad_fn=vg)  # vg(p, j)

    Which form when (XLA's ``memory_analysis``, arguments + temporaries, donated params and
    state, an MLP of 2.2M parameters, m = 32; ``tests/test_msam_memory.py``):

    * ``updates=None``, ``"sequential"`` (the lean form): SAM's memory plus one parameter copy
      (the running sum of the ``g₂_j``) whatever m: 4.0 copies where SAM takes 3.1. The clean
      gradients run inside ``lax.scan``, where XLA:CPU runs a convolution's gradient slower
      (``experiments/benchmarks``' cond benchmark). Use it when m copies do not fit.
    * stacked ``updates``, ``"sequential"``: m + 1 copies more than SAM (36.0), the clean pass
      outside the scan.
    * ``"parallel"`` (stacked or ``None``): m perturbed copies and m second gradients at once
      under ``vmap`` (34.5): the fastest on XLA:CPU for convolutions (one batched program) and
      the form the trainer's per-device mode shards over devices. Use it while m copies fit.

    No second-gradient policy with ``updates=None`` (its decision needs ‖g‖² before the step).
    """
    return sam(
        rho,
        num_microbatches=num_microbatches,
        axis_name=axis_name,
        cosine=cosine,
        microbatch_execution=microbatch_execution,
    )


def noise_resistant_sam(
    rho: ScalarOrSchedule = 0.05,
    mu: float = 0.01,
    *,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Noise-resistant SAM (Su, Jin & Wang, Neural Networks 181, 2024), in one call.

    ``optax.chain(sam(rho), noise_resistant(mu))``: chain a base optimizer after it. See
    :func:`sharpjax.noise_resistant` for the rule and what is (not) verified about it.
    """
    from sharpjax.feedback import noise_resistant

    sharpness = sam(
        rho,
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
        cosine=cosine or None,  # False: still measured where it is free
    )
    return optax.chain(sharpness, noise_resistant(mu))


def fsam(
    rho: ScalarOrSchedule = 0.05,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    *,
    reading: str = "paper",
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    groups: ParamGroups | None = None,
    cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Friendly-SAM (F-SAM; Li et al., CVPR 2024): SAM perturbed along the gradient noise.

    ``m_t = λ m_{t−1} + (1 − λ) g_t``, ``d_t = g_t − σ m_t``, ``ε = ρ d_t/‖d_t‖``, output
    ``∇L(w + ε)`` (``reading="code"``: the authors' code's order, see
    :func:`sharpjax.friendly_perturbation`). Defaults σ = 1, λ = 0.9 (the authors' code), ρ =
    0.05 (SAM's: F-SAM is tuned like SAM; the paper's CIFAR-100 runs use 0.2). σ = 0 is SAM.
    """
    return sharpness_aware(
        _grouped(friendly_perturbation(sigma, lmbda, reading), groups),
        rho=rho,
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
        cosine=cosine or None,  # False: still measured where it is free
    )


class WsamState(NamedTuple):
    """Decoupled WSAM: the sharpness-aware state (its ``g₂``) and the base optimizer's."""

    sharpness: Any
    base: Any


def wsam(
    rho: ScalarOrSchedule = 0.05,
    gamma: float = 0.9,
    perturbation: PerturbationRule | None = None,
    *,
    base_optimizer: optax.GradientTransformation | None = None,
    learning_rate: ScalarOrSchedule | None = None,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    groups: ParamGroups | None = None,
) -> optax.GradientTransformationExtraArgs:
    """WSAM (Yue et al., KDD 2023): sharpness as a regulariser of weight ``γ/(1 − γ)``.

    The objective ``L(w) + γ/(1 − γ) [L(w + ε) − L(w)]`` with SAM's ``ε = ρ g/‖g‖``.

    * Without ``base_optimizer`` (coupled): output ``g + γ/(1 − γ) (g₂ − g)``, chained before
      a base optimizer like :func:`sam`.
    * With ``base_optimizer`` and its ``learning_rate`` η (decoupled, the default of the
      authors' code, atorch ``WeightedSAM(decouple=True)``): the base optimizer steps on the
      clean gradient ``g`` alone and the sharpness term is added as a plain gradient step,
      ``update = base(g) − η_t γ/(1 − γ) (g₂ − g)``; this transformation is then the whole
      optimizer (chain nothing after it). With plain SGD (no momentum, no weight decay) both
      forms are the same step.

    ``0 ≤ γ < 1``: γ = 0 is the base optimizer, γ = 1/2 is SAM (coupled). Defaults ρ = 0.05,
    γ = 0.9 (the authors' code). The diagnostics carry ``sharpness_weight`` (coupled form).
    Both forms match kozistr/pytorch_optimizer's ``WSAM`` (``decouple=False``/``True``): with
    α = γ/(1 − γ), ``α g₂ + (1 − α) g``, or the base step on g then ``w −= η α (g₂ − g)``.
    """
    check_wsam_gamma(gamma)
    rule = _grouped(perturbation or sam_perturbation(), groups)
    keywords = dict(
        rho=rho,
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
    )
    if base_optimizer is None:
        if learning_rate is not None:
            raise ValueError(
                "learning_rate is the base optimizer's, for the decoupled form: pass "
                "base_optimizer too, or drop learning_rate for the coupled form."
            )
        return sharpness_aware(rule, wsam_combination(gamma), **keywords)
    if learning_rate is None:
        raise ValueError(
            "wsam(base_optimizer=...) (the decoupled form) needs learning_rate, the base "
            "optimizer's learning rate (a float or the same schedule)."
        )
    check_scalar_or_schedule("learning_rate", learning_rate, 0.0)
    if num_microbatches is not None:
        raise ValueError(
            "wsam(base_optimizer=...) steps the base optimizer on the clean gradient, which "
            "with num_microbatches comes stacked; use the coupled form (no base_optimizer) "
            "with micro-batches."
        )
    if not isinstance(base_optimizer, optax.GradientTransformation):
        raise TypeError(
            f"base_optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1, "
            f"momentum=0.9)), got {type(base_optimizer).__name__}."
        )
    weight = gamma / (1.0 - gamma)
    sharpness = sharpness_aware(rule, **keywords)
    base = optax.with_extra_args_support(base_optimizer)

    def init_fn(params):
        return WsamState(sharpness.init(params), base.init(params))

    def update_fn(updates, state, params=None, **extra):
        g2, sharp_state = sharpness.update(updates, state.sharpness, params, **extra)
        step, base_state = base.update(updates, state.base, params)
        lr = evaluate(learning_rate, state.sharpness.count, 0.0)
        out = jax.tree.map(
            lambda s, y, x: (s - lr * weight * (y.astype(s.dtype) - x.astype(s.dtype))).astype(
                s.dtype
            ),
            step,
            g2,
            updates,
        )
        return out, WsamState(sharp_state, base_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rho_from_lr(
    lr_schedule: optax.Schedule,
    rho_max: float,
    rho_min: float = 0.0,
    *,
    lr_max: float,
    lr_min: float = 0.0,
) -> optax.Schedule:
    """ρ that follows the learning rate, as big_vision's GSAM trainer does.

    ``ρ_t = ρ_min + (ρ_max − ρ_min) (lr_t − lr_min)/(lr_max − lr_min)`` with
    ``lr_t = lr_schedule(t)``: ρ_max at the peak learning rate, ρ_min where it reaches lr_min
    (GSAM, Zhuang et al., ICLR 2022, decays ρ with the learning rate). Pass the result as
    ``rho`` of any constructor; a ρ below 0 (lr under lr_min) is clamped to 0 by the step.
    """
    if not callable(lr_schedule):
        raise TypeError("lr_schedule must be an optax schedule (a function of the step count).")
    check_scalar_or_schedule("rho_max", rho_max, 0.0)
    check_scalar_or_schedule("rho_min", rho_min, 0.0)
    check_scalar_or_schedule("lr_max", lr_max, -float("inf"))
    check_scalar_or_schedule("lr_min", lr_min, -float("inf"))
    if rho_min > rho_max:
        raise ValueError(f"rho_min ({rho_min}) must not exceed rho_max ({rho_max}).")
    if not lr_max > lr_min:
        raise ValueError(
            f"lr_max ({lr_max}) must exceed lr_min ({lr_min}): they are the learning rates at "
            "which ρ is rho_max and rho_min (the schedule's peak and its final value)."
        )

    def schedule(count):
        fraction = (lr_schedule(count) - lr_min) / (lr_max - lr_min)
        return rho_min + (rho_max - rho_min) * fraction

    return schedule
