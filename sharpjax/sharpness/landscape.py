"""Loss landscapes: the loss on a 1-D or 2-D slice of parameter space, with filter normalisation.

Li, Xu, Taylor, Studer & Goldstein, *Visualizing the Loss Landscape of Neural Nets*, NeurIPS
2018 (code: github.com/tomgoldstein/loss-landscape). The slice through ``w`` along directions
``d₁`` (and ``d₂``) is ``α ↦ L(w + α d₁)`` or ``(α, β) ↦ L(w + α d₁ + β d₂)``; every grid point
is evaluated in one vmapped computation.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sharpjax.sharpness._batches import DatasetLoss, evaluate
from sharpjax.sharpness._tree import Layout, sharded_gaussian
from sharpjax.sharpness._validate import check_float_params, choice, positive_int, require_key

PyTree = Any

NORMALIZATIONS = ("filter", "layer", None)


def _normalize_leaf(d: jax.Array, w: jax.Array, normalization: str | None, filter_axis: int):
    if normalization is None:
        return d
    if normalization == "layer":
        axes = tuple(range(w.ndim))
    else:
        axes = tuple(a for a in range(w.ndim) if a != filter_axis % w.ndim)
    w_norm = jnp.sqrt(jnp.sum(w**2, axis=axes, keepdims=True))
    d_norm = jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True))
    # A zero filter of d (e.g. a given direction that leaves it alone) stays zero, not NaN.
    return d * w_norm / jnp.where(d_norm > 0, d_norm, 1)


def normalize_direction(
    direction: PyTree,
    params: PyTree,
    normalization: str | None = "filter",
    *,
    filter_axis: int = -1,
    include_1d: bool = False,
) -> PyTree:
    """Rescale ``direction`` to the size of the weights it perturbs (Li et al. 2018, §4).

    ``"filter"``: each filter ``f`` of each array, ``d_f ← d_f ‖w_f‖ / ‖d_f‖`` (Frobenius norms).
    A filter is one slice along ``filter_axis``: flax stores Dense kernels as ``(in, out)`` and
    Conv kernels as ``(..., in, out)``, so the default ``-1`` makes a filter one output unit or
    channel (PyTorch layouts put it first: ``filter_axis=0``). ``"layer"``: the same with the
    whole array as one filter. ``None``: ``direction`` unchanged.

    One-dimensional (and scalar) arrays, i.e. biases and BatchNorm scales and offsets, are set to
    zero (``include_1d=False``, the default of the paper's code, ``ignore='biasbn'``) or, with
    ``include_1d=True``, to the weights themselves, ``d = w``, as the paper's code does for them
    otherwise. Both are applied whatever ``normalization`` is, except ``None``.

    Args:
      direction: a pytree with the structure of ``params``.
      params: the weights ``w``.
      normalization: ``"filter"`` (default), ``"layer"`` or ``None``.
      filter_axis: the axis that indexes filters in arrays of 2 or more dimensions.
      include_1d: perturb 1-D parameters along ``d = w`` instead of leaving them fixed.

    Returns:
      The normalised direction, structure of ``params``.
    """
    choice("normalization", normalization, NORMALIZATIONS)
    if jax.tree.structure(direction) != jax.tree.structure(params):
        raise ValueError(
            "direction must have the same pytree structure as params, got "
            f"{jax.tree.structure(direction)} vs {jax.tree.structure(params)}."
        )

    def leaf(d, w):
        if normalization is None:
            return d
        if jnp.ndim(w) <= 1:
            return jnp.asarray(w, d.dtype) if include_1d else jnp.zeros_like(d)
        return _normalize_leaf(d, w, normalization, filter_axis)

    return jax.tree.map(leaf, direction, params)


def random_direction(
    key: jax.Array,
    params: PyTree,
    normalization: str | None = "filter",
    *,
    filter_axis: int = -1,
    include_1d: bool = False,
) -> PyTree:
    """A Gaussian direction, normalised by :func:`normalize_direction` (filter-wise by default)."""
    return normalize_direction(
        sharded_gaussian(key, params),
        params,
        normalization,
        filter_axis=filter_axis,
        include_1d=include_1d,
    )


class Landscape(NamedTuple):
    """A loss landscape.

    Attributes:
      coordinates: a tuple of 1-D grids, one per direction (``α``, and ``β`` in 2-D).
      losses: shape ``(len(α),)``, or ``(len(α), len(β))`` with ``losses[i, j] = L(w + α_i d₁ +
        β_j d₂)`` (so ``plt.contour(α, β, losses.T)``).
      directions: the directions used (after normalisation), stacked along a leading axis of
        size 1 or 2 in every leaf.
    """

    coordinates: tuple[jax.Array, ...]
    losses: jax.Array
    directions: PyTree


def _grid_losses(loss: Callable, params: PyTree, directions: PyTree, points: jax.Array):
    """Losses at ``points`` of shape ``(n, k)``, or ``(chunks, chunk, k)`` for chunk by chunk."""

    def at(c):
        return loss(jax.tree.map(lambda w, d: w + jnp.tensordot(c, d, 1), params, directions))

    if points.ndim == 2:
        return jax.vmap(at)(points)
    # The chunk size rides in the shape: a static argument would recompile per batch.
    return jax.lax.map(jax.vmap(at), points).ravel()


def loss_landscape(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    key: jax.Array | None = None,
    num_directions: int = 1,
    coordinates: jax.Array | Sequence[jax.Array] | None = None,
    *,
    directions: Sequence[PyTree] | None = None,
    normalization: str | None = "filter",
    filter_axis: int = -1,
    include_1d: bool = False,
    chunk_size: int | None = None,
    batches: Iterable | None = None,
) -> Landscape:
    """The loss on a 1-D or 2-D slice through ``params`` (Li et al., NeurIPS 2018).

        1-D: ``L(w + α d₁)``;   2-D: ``L(w + α d₁ + β d₂)``,

    along ``num_directions`` random Gaussian directions drawn from ``key``, or along the given
    ``directions`` (e.g. top Hessian eigenvectors from :func:`top_eigenvalues` with
    ``return_eigenvectors=True``, or the last SAM perturbation ε). Every direction is normalised
    by :func:`normalize_direction` with ``normalization`` (default ``"filter"``, so slices of
    networks of different scales are comparable; pass ``normalization=None`` to use given
    directions as they are, e.g. ε so that ``α = 1`` is ``w + ε``). The whole grid is one
    vmapped computation (``chunk_size`` points at a time with ``lax.map`` to bound memory).

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, or ``loss_fn(params, batch)`` with ``batches``.
      params: the centre ``w``.
      key: PRNG key for random directions (not needed with ``directions``).
      num_directions: 1 or 2 random directions (ignored with ``directions``).
      coordinates: the grid along each direction: one 1-D array used for every direction, or one
        per direction; default ``linspace(-1, 1, 41)`` in 1-D and ``linspace(-1, 1, 21)`` in 2-D.
      directions: a sequence of 1 or 2 pytrees with the structure of ``params``.
      normalization: ``"filter"`` (default), ``"layer"`` or ``None``.
      filter_axis: axis of the filters in arrays of 2+ dimensions (default -1, flax layout).
      include_1d: perturb biases and normalisation parameters along ``d = w`` (default: zero).
      chunk_size: grid points per vectorised chunk (default: all at once).
      batches: optional iterable of batches; the loss is then the example-weighted mean over
        them, one batch on the device at a time. For data parallelism shard each batch over a
        mesh (see :mod:`sharpjax.sharpness`).

    Returns:
      A :class:`Landscape`; its loss at ``α = β = 0`` is ``L(w)``.
    """
    check_float_params(params)
    if directions is None:
        require_key(key, "for random directions (or pass directions=)")
        positive_int("num_directions", num_directions)
        if num_directions > 2:
            raise ValueError(f"num_directions must be 1 or 2, got {num_directions}.")
        keys = jax.random.split(key, num_directions)
        options = {"filter_axis": filter_axis, "include_1d": include_1d}
        directions = [random_direction(k, params, normalization, **options) for k in keys]
    else:
        if isinstance(directions, Mapping) or not isinstance(directions, Sequence):
            raise TypeError(
                "directions must be a list of 1 or 2 pytrees shaped like params, got "
                f"{type(directions).__name__}; wrap a single direction as [d]."
            )
        if len(directions) not in (1, 2):
            raise ValueError(f"directions must hold 1 or 2 directions, got {len(directions)}.")
        directions = [
            normalize_direction(
                d, params, normalization, filter_axis=filter_axis, include_1d=include_1d
            )
            for d in directions
        ]
    if chunk_size is not None:
        positive_int("chunk_size", chunk_size)
    k = len(directions)
    if coordinates is None:
        coordinates = jnp.linspace(-1.0, 1.0, 41 if k == 1 else 21)
    if isinstance(coordinates, Sequence) and not hasattr(coordinates, "shape"):
        if len(coordinates) != k:
            raise ValueError(
                f"coordinates holds {len(coordinates)} grids for {k} directions; pass one grid "
                "per direction, or a single 1-D array for all."
            )
        grids = tuple(jnp.asarray(c) for c in coordinates)
    else:
        grids = (jnp.asarray(coordinates),) * k
    if any(g.ndim != 1 or g.size == 0 for g in grids):
        raise ValueError(
            "coordinates must be non-empty 1-D arrays, got shapes "
            f"{[tuple(g.shape) for g in grids]}."
        )
    mesh = jnp.meshgrid(*grids, indexing="ij")
    points = jnp.stack([m.ravel() for m in mesh], axis=-1)
    # The directions in the params' layout (and sharding), stacked along a leading axis.
    stacked = Layout(params).stack(jax.tree.map(lambda *ds: jnp.stack(ds), *directions))
    n = points.shape[0]
    if chunk_size is not None and chunk_size < n:
        # Padding points sit at the centre; they are computed and dropped.
        points = jnp.concatenate([points, jnp.zeros((-n % chunk_size, k), points.dtype)])
        points = points.reshape(-1, chunk_size, k)
    losses = evaluate(_landscape, loss_fn, batches, params, stacked, points)
    return Landscape(grids, losses[:n].reshape(mesh[0].shape), stacked)


def _landscape(
    loss: DatasetLoss, params: PyTree, directions: PyTree, points: jax.Array
) -> jax.Array:
    return loss.accumulate(_grid_losses, params, directions, points)


def plot_landscape(
    landscapes: Landscape | Mapping[str, Landscape],
    *,
    title: str | None = None,
    log: bool = True,
    num_levels: int = 18,
    ylabel: str = "loss",
):
    """A matplotlib figure of one or several landscapes, side by side on shared scales.

    1-D landscapes are drawn as curves on one axis; 2-D ones as filled contours, one panel each,
    with shared (logarithmic by default) levels and a centre marker. ``landscapes`` is one
    :class:`Landscape` or a mapping ``{label: Landscape}`` (e.g. ``{"SGD": ..., "SAM": ...}``),
    all of the same dimension. Returns the ``Figure`` (matplotlib is imported here only).
    """
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if isinstance(landscapes, Landscape):
        landscapes = {"": landscapes}
    if not isinstance(landscapes, Mapping) or not landscapes:
        raise TypeError("landscapes must be a Landscape or a non-empty {label: Landscape} dict.")
    dims = {len(ls.coordinates) for ls in landscapes.values()}
    if len(dims) != 1:
        raise ValueError("plot_landscape cannot mix 1-D and 2-D landscapes in one figure.")
    (dim,) = dims
    if dim == 1:
        fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
        for label, ls in landscapes.items():
            ax.plot(np.asarray(ls.coordinates[0]), np.asarray(ls.losses), label=label or None)
        ax.set(xlabel="α", ylabel=ylabel, yscale="log" if log else "linear")
        if any(landscapes):
            ax.legend()
        ax.set_title(title or "1-D loss landscape")
        return fig
    zs = [np.asarray(ls.losses) for ls in landscapes.values()]
    lo, hi = min(float(z.min()) for z in zs), max(float(z.max()) for z in zs)
    if log:
        lo = max(lo, hi * 1e-6, np.finfo(np.float32).tiny)
        levels = np.geomspace(lo, hi, num_levels)
        norm = matplotlib.colors.LogNorm(levels[0], levels[-1])
    else:
        levels, norm = np.linspace(lo, hi, num_levels), None
    n = len(landscapes)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1, 4), layout="constrained", squeeze=False)
    for ax, (label, ls), z in zip(axes[0], landscapes.items(), zs, strict=True):
        a, b = (np.asarray(c) for c in ls.coordinates)
        z = np.clip(z, levels[0], levels[-1]).T  # rows β, columns α
        filled = ax.contourf(a, b, z, levels=levels, norm=norm, cmap="viridis")
        ax.contour(a, b, z, levels=levels[::3], colors="white", linewidths=0.6)
        ax.plot(0, 0, "w+")
        ax.set(title=label, xlabel="α", ylabel="β", aspect="equal")
    bar = fig.colorbar(filled, ax=axes[0].tolist(), label=ylabel)
    if log:  # contourf's log colour bar labels its levels, not decades
        decades = np.arange(np.floor(np.log10(levels[0])), np.ceil(np.log10(levels[-1])) + 1)
        bar.set_ticks([t for t in 10.0**decades if levels[0] <= t <= levels[-1]])
        bar.ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatterSciNotation())
        bar.ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if title:
        fig.suptitle(title)
    return fig
