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
    "asam",
    "diagnostics",
    "gsam",
    "gsam_combination",
    "microbatch_value_and_grad",
    "msam",
    "noise_resistant",
    "noise_resistant_sam",
    "parallel",
    "sam",
    "sam_perturbation",
    "saner",
    "saner_combination",
    "saner_mask",
    "saner_warmup",
    "sharpness",
    "sharpness_aware",
    "split_microbatches",
    "vasso",
    "vasso_perturbation",
]
