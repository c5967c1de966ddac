"""Sharpness measures: pure, jittable functions of a loss (or logits) function, parameters and
data, built on Hessian-vector products; none forms a dense Hessian.

- :func:`hvp`, :func:`hessian_trace` (Hutchinson, Hutch++)
- :func:`top_eigenvalues`, :func:`spectral_density` (Lanczos, stochastic Lanczos quadrature)
- :func:`ggn_vector_product`, :func:`fisher_vector_product`; the trace, eigenvalue and density
  measures take ``curvature="hessian" | "ggn" | "fisher"``, and trace and eigenvalues
  ``per_layer=True`` (one result per top-level parameter entry)
- :func:`loss_landscape`, :func:`plot_landscape`, :func:`random_direction`,
  :func:`normalize_direction` (filter-normalised slices, Li et al. 2018)
- :func:`adaptive_sharpness` (worst and average case, Andriushchenko et al. 2023)
- :func:`hessian_diagonal` (exact per-example GGN for softmax cross-entropy, or Hutchinson)
- :func:`minimum_sharpness`, :func:`apply_scales` (Ibayashi et al. 2021)

Loss-based measures take ``loss_fn(params)``, or ``loss_fn(params, batch)`` with
``batches=``; logits-based ones take ``logits_fn(params, x)`` and ``(x, y)`` or an iterable of
such batches. Over several batches every measure uses the example-weighted mean loss.

Data parallelism and models too big for one device's batch: every measure is a jitted program
of sums over examples, so a batch sharded over a device mesh, e.g.
``jax.device_put(batch, NamedSharding(mesh, PartitionSpec("batch")))`` with params replicated,
runs data-parallel as it is (XLA partitions the sums and all-reduces them), giving the
one-device value up to float32 reduction order. Pass the sharded batches as ``batches=[...]``
(or call the measure inside your own ``jax.jit`` with the batch as an argument; a ``loss_fn``
that closes over arrays bakes them into the program as constants). When even the per-device
share does not fit, stream: ``batches`` may be any number of batches, of which one is on the
devices at a time (the measure then runs one jitted call per batch and product).
"""

from sharpjax.sharpness.adaptive import AdaptiveSharpnessResult, adaptive_sharpness
from sharpjax.sharpness.curvature import (
    SoftmaxCrossEntropy,
    fisher_vector_product,
    ggn_vector_product,
)
from sharpjax.sharpness.diagonal import hessian_diagonal
from sharpjax.sharpness.hvp import TraceEstimate, hessian_trace, hvp
from sharpjax.sharpness.lanczos import spectral_density, top_eigenvalues
from sharpjax.sharpness.landscape import (
    Landscape,
    loss_landscape,
    normalize_direction,
    plot_landscape,
    random_direction,
)
from sharpjax.sharpness.minimum import MinimumSharpnessResult, apply_scales, minimum_sharpness

__all__ = [
    "AdaptiveSharpnessResult",
    "Landscape",
    "MinimumSharpnessResult",
    "SoftmaxCrossEntropy",
    "TraceEstimate",
    "adaptive_sharpness",
    "apply_scales",
    "fisher_vector_product",
    "ggn_vector_product",
    "hessian_diagonal",
    "hessian_trace",
    "hvp",
    "loss_landscape",
    "minimum_sharpness",
    "normalize_direction",
    "plot_landscape",
    "random_direction",
    "spectral_density",
    "top_eigenvalues",
]
