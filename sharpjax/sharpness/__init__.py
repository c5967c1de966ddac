"""Sharpness measures: pure, jittable functions of a loss (or logits) function, parameters and
data, built on Hessian-vector products; none forms a dense Hessian.

- :func:`hvp`, :func:`hessian_trace` (Hutchinson, Hutch++)
- :func:`top_eigenvalues`, :func:`spectral_density` (Lanczos, stochastic Lanczos quadrature),
  :func:`plot_spectral_density`
- :func:`ggn_vector_product`, :func:`fisher_vector_product`; the trace, eigenvalue and density
  measures take ``curvature="hessian" | "ggn" | "fisher"``, and trace and eigenvalues
  ``per_layer=True`` (one result per top-level parameter entry)
- :func:`loss_landscape`, :func:`plot_landscape`, :func:`random_direction`,
  :func:`normalize_direction` (filter-normalised slices, Li et al. 2018)
- :func:`adaptive_sharpness` (worst and average case, Andriushchenko et al. 2023)
- :func:`hessian_diagonal` (exact per-example GGN for softmax cross-entropy, or Hutchinson)
- :func:`minimum_sharpness`, :func:`apply_scales` (Ibayashi et al. 2021)

Results: every measure returns a NamedTuple, the estimate first and then how it was obtained
and how reliable it is (:class:`TraceEstimate`, :class:`EigenvalueEstimate`,
:class:`SpectralDensity`, :class:`Landscape`, :class:`AdaptiveSharpnessResult`,
:class:`MinimumSharpnessResult`), or ``{block name: that NamedTuple}`` with ``per_layer=True``;
products (:func:`hvp`, :func:`ggn_vector_product`, ...) and :func:`hessian_diagonal` return a
pytree shaped like ``params``.

Loss-based measures take ``loss_fn(params)``, or ``loss_fn(params, batch)`` with
``batches=``; logits-based ones take ``logits_fn(params, x)`` and ``(x, y)`` or an iterable of
such batches. Over several batches every measure uses the example-weighted mean loss.

Data parallelism and models too big for one device's batch: every measure is a jitted program
of sums over examples, so a batch sharded over a device mesh, e.g.
``jax.device_put(batch, NamedSharding(mesh, PartitionSpec("batch")))`` with params replicated,
runs data-parallel as it is (XLA partitions the sums and all-reduces them), giving the
one-device value up to float32 reduction order. Pass the sharded batches as ``batches=[...]``
(or call the measure inside your own ``jax.jit`` with the batch as an argument; a ``loss_fn``
that closes over arrays passes them to the program whole). When even the per-device
share does not fit, stream: ``batches`` may be any number of batches, of which one is on the
devices at a time (the measure then runs one jitted call per batch and product).

Models too big for one device: params sharded over a mesh (e.g. split along an ``fsdp`` axis
with ``NamedSharding``) are taken as they are. Every parameter-sized vector a measure builds
(the Lanczos basis, probes, directions, perturbations) is kept in the params' own pytree layout
and sharding, never raveled into one flat vector, so the memory per device falls with the shard
count (:mod:`sharpjax.sharpness._tree`; ``tests/multidevice/measures_8dev.py``).

Compilation is cached on ``loss_fn`` as traced at each call, never on the function object: a
``loss_fn`` that reads changed data through a closure or a global sees the new data, and a new
lambda with the same body reuses the compilation (one trace of ``loss_fn`` per call).
"""

from sharpjax.sharpness.adaptive import AdaptiveSharpnessResult, adaptive_sharpness
from sharpjax.sharpness.curvature import (
    SoftmaxCrossEntropy,
    fisher_vector_product,
    ggn_vector_product,
)
from sharpjax.sharpness.diagonal import hessian_diagonal
from sharpjax.sharpness.hvp import TraceEstimate, hessian_trace, hvp
from sharpjax.sharpness.lanczos import (
    EigenvalueEstimate,
    SpectralDensity,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)
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
    "EigenvalueEstimate",
    "Landscape",
    "MinimumSharpnessResult",
    "SoftmaxCrossEntropy",
    "SpectralDensity",
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
    "plot_spectral_density",
    "random_direction",
    "spectral_density",
    "top_eigenvalues",
]
