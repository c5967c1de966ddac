"""Sharpness measures: pure, jittable functions of a loss (or logits) function, parameters and
data, built on Hessian-vector products; none forms a dense Hessian.

- :func:`hvp`, :func:`hessian_trace` (Hutchinson, Hutch++)
- :func:`top_eigenvalues`, :func:`spectral_density` (Lanczos, stochastic Lanczos quadrature)
- :func:`adaptive_sharpness` (worst and average case, Andriushchenko et al. 2023)
- :func:`hessian_diagonal` (exact per-example GGN for softmax cross-entropy, or Hutchinson)
- :func:`minimum_sharpness`, :func:`apply_scales` (Ibayashi et al. 2021)

Loss-based measures take ``loss_fn(params)``, or ``loss_fn(params, batch)`` with
``batches=``; logits-based ones take ``logits_fn(params, x)`` and ``(x, y)`` or an iterable of
such batches. Over several batches every measure uses the example-weighted mean loss.
"""

from sharpjax.sharpness.adaptive import AdaptiveSharpnessResult, adaptive_sharpness
from sharpjax.sharpness.diagonal import hessian_diagonal
from sharpjax.sharpness.hvp import TraceEstimate, hessian_trace, hvp
from sharpjax.sharpness.lanczos import spectral_density, top_eigenvalues
from sharpjax.sharpness.minimum import MinimumSharpnessResult, apply_scales, minimum_sharpness

__all__ = [
    "AdaptiveSharpnessResult",
    "MinimumSharpnessResult",
    "TraceEstimate",
    "adaptive_sharpness",
    "apply_scales",
    "hessian_diagonal",
    "hessian_trace",
    "hvp",
    "minimum_sharpness",
    "spectral_density",
    "top_eigenvalues",
]
