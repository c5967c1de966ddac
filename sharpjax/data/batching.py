"""Host-side minibatching and on-device CIFAR-style augmentation.

``iterate_batches`` is plain NumPy (an epoch's permutation is host data, not traced), and is a
pure function of ``(seed, epoch)`` so a resumed run sees exactly the batches it would have
seen. ``augment_crop_flip`` is the standard CIFAR augmentation (4-pixel zero padding, random
32x32 crop, random horizontal flip; He et al., 2016, "Deep Residual Learning", Sec. 4.2) as a
jittable JAX function, so it runs inside the jitted train step.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np


def iterate_batches(
    x: np.ndarray,
    *arrays: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Yields ``(x[idx], *(a[idx] for a in arrays))`` for one epoch.

    The order is a permutation drawn from ``numpy.random.default_rng([seed, epoch])``: fixed by
    ``(seed, epoch)`` and different from epoch to epoch. With ``drop_last`` (the default, so
    every step has the same shape and jit compiles once) the last ``N % batch_size`` examples
    of the permutation are skipped; which ones changes every epoch.

    Args:
      x: inputs, leading axis = examples.
      *arrays: more arrays with the same leading size (labels, indices, ...).
      batch_size: examples per batch, ``1 <= batch_size <= N``.
      seed: non-negative run seed.
      epoch: non-negative epoch number.
      shuffle: if False, keep the stored order.
      drop_last: drop the final incomplete batch.

    Raises:
      ValueError: on a bad ``batch_size`` or mismatched leading sizes.
    """
    n = len(x)
    for i, a in enumerate(arrays):
        if len(a) != n:
            raise ValueError(f"arrays[{i}] has {len(a)} examples but x has {n}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the dataset size), got {batch_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield (x[idx], *(a[idx] for a in arrays))


def augment_crop_flip(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """Random crop after zero padding, then random horizontal flip, per image (NHWC).

    Each image is padded by ``padding`` zeros on every side, a window of the original size is
    cut at an offset uniform in ``[0, 2 * padding]^2``, and it is mirrored left-right with
    probability 1/2. Jittable; works for any ``H, W`` (CIFAR: 32x32, ``padding=4``).

    Args:
      key: a JAX PRNG key.
      images: ``(N, H, W, C)`` array (normalised images: the zero padding is then the mean,
        which is what the usual pipelines that normalise first also do).
      padding: pixels of zero padding per side; a Python int (static under ``jax.jit``,
        e.g. ``jax.jit(augment_crop_flip, static_argnums=2)``), since it sets array shapes.

    Returns:
      Augmented images with the shape and dtype of ``images``.
    """
    n, h, w, c = images.shape
    k_y, k_x, k_f = jax.random.split(key, 3)
    dy = jax.random.randint(k_y, (n,), 0, 2 * padding + 1)
    dx = jax.random.randint(k_x, (n,), 0, 2 * padding + 1)
    flip = jax.random.bernoulli(k_f, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def one(img: jax.Array, y: jax.Array, x: jax.Array, f: jax.Array) -> jax.Array:
        crop = jax.lax.dynamic_slice(img, (y, x, 0), (h, w, c))
        return jnp.where(f, crop[:, ::-1, :], crop)

    return jax.vmap(one)(padded, dy, dx, flip)
