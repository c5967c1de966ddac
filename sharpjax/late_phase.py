"""Late-phase SAM: the base optimizer first, SAM only from a given fraction of training on.

Zhou, Wang, Li & Huang (*Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late
in Training*, ICLR 2025) find that SAM applied only in the late phase of training (about the
last 25 of 200 epochs) reaches minima as flat, and test accuracy as high, as SAM throughout.
Here it is a :class:`~sharpjax.core.SecondGradientPolicy`: steps before ``start_step`` take
no second gradient (one gradient, the combination rule's ``skip``: the clean gradient),
steps from it on are SAM steps. The decision depends on the step count alone, so it is known
before the step (:func:`sharpjax.efficient.plan_second_gradient`, ``planned_step``), and a
training loop can run the two phases as two compiled programs without a ``lax.cond``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from sharpjax.core import (
    CombinationRule,
    PerturbationRule,
    ScalarOrSchedule,
    SecondGradientPolicy,
    check_scalar_or_schedule,
    sharpness_aware,
)
from sharpjax.efficient import _check_int, _planned
from sharpjax.perturbations import sam_perturbation

__all__ = ["late_phase_policy", "late_phase_sam", "late_phase_start"]


def late_phase_policy(start_step: int) -> SecondGradientPolicy:
    """Takes the second gradient on steps ``start_step, start_step + 1, ...``, none before.

    ``start_step = 0`` is SAM on every step. The decision is known before the step.
    """
    _check_int("start_step", start_step, low=0)

    def decide(sq, state, count):
        del sq
        return jnp.asarray(count) >= start_step, state, {}

    return _planned(lambda params: (), decide, needs_grad_sq=False)


def late_phase_start(total_steps: int, start_fraction: float) -> int:
    """The first SAM step, ``⌊start_fraction · total_steps⌋``."""
    _check_int("total_steps", total_steps)
    check_scalar_or_schedule("start_fraction", start_fraction, 0.0, 1.0)
    if callable(start_fraction):
        raise TypeError("start_fraction must be a number in [0, 1], not a schedule.")
    return math.floor(float(start_fraction) * total_steps)


def late_phase_sam(
    total_steps: int,
    rho: ScalarOrSchedule = 0.05,
    start_fraction: float = 0.875,
    *,
    perturbation: PerturbationRule | None = None,
    combination: CombinationRule | None = None,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Late-phase SAM (Zhou et al., ICLR 2025): the base optimizer on the steps before
    ``⌊start_fraction · total_steps⌋``, SAM (``ε = ρ g/‖g‖``, output ``∇L(w + ε)``) from then on.

    Default ``start_fraction = 0.875`` (SAM for the last 25 of 200 epochs, the paper's
    headline setting); 0 is SAM throughout, 1 the base optimizer throughout. A run of
    ``total_steps`` steps costs ``total_steps + (total_steps − start)`` gradients instead of
    SAM's ``2 · total_steps``. ``perturbation``/``combination`` apply the late phase to another
    rule (late-phase VaSSO, SANER). Chain a base optimizer after it, as for :func:`sharpjax.sam`.
    """
    start = late_phase_start(total_steps, start_fraction)
    return sharpness_aware(
        perturbation or sam_perturbation(),
        combination,
        rho=rho,
        policy=late_phase_policy(start),
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
        cosine=cosine or None,  # False: still measured where it is free
    )
