"""sharpjax: sharpness-aware training and sharpness measures for JAX/Flax."""

from sharpjax import parallel, sharpness
from sharpjax.combinations import gsam_combination, saner_combination, saner_mask
from sharpjax.core import (
    CombinationRule,
    PerturbationRule,
    SharpnessAwareState,
    diagnostics,
    sharpness_aware,
)
from sharpjax.efficient import (
    adaptive_policy,
    ae_sam,
    ae_sam_threshold,
    esam,
    every_k_steps,
    grst_schedule,
    looksam,
    looksam_combination,
    momentum_sam,
    momentum_sam_weights,
    random_policy,
    random_sam,
    stochastic_perturbation,
)
from sharpjax.feedback import NoiseResistantState, noise_resistant
from sharpjax.optimizers import (
    asam,
    gsam,
    microbatch_value_and_grad,
    msam,
    noise_resistant_sam,
    sam,
    saner,
    saner_warmup,
    split_microbatches,
    vasso,
)
from sharpjax.perturbations import adaptive_perturbation, sam_perturbation, vasso_perturbation

__version__ = "0.1.0"

__all__ = [
    "CombinationRule",
    "NoiseResistantState",
    "PerturbationRule",
    "SharpnessAwareState",
    "adaptive_perturbation",
    "adaptive_policy",
    "ae_sam",
    "ae_sam_threshold",
    "asam",
    "diagnostics",
    "esam",
    "every_k_steps",
    "grst_schedule",
    "gsam",
    "gsam_combination",
    "looksam",
    "looksam_combination",
    "microbatch_value_and_grad",
    "momentum_sam",
    "momentum_sam_weights",
    "msam",
    "noise_resistant",
    "noise_resistant_sam",
    "parallel",
    "random_policy",
    "random_sam",
    "sam",
    "sam_perturbation",
    "saner",
    "saner_combination",
    "saner_mask",
    "saner_warmup",
    "sharpness",
    "sharpness_aware",
    "split_microbatches",
    "stochastic_perturbation",
    "vasso",
    "vasso_perturbation",
]
