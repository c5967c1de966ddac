"""Host-side minibatching and on-device CIFAR-style augmentation.

``iterate_batches`` is plain NumPy (an epoch's permutation is host data, not traced), and is a
pure function of ``(seed, epoch)`` so a resumed run sees exactly the batches it would have
seen. ``augment_crop_flip`` is the standard CIFAR augmentation (4-pixel zero padding, random
32x32 crop, random horizontal flip; He et al., 2016, "Deep Residual Learning", Sec. 4.2) as a
jittable JAX function, so it runs inside the jitted train step.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def iterate_batches(
    x: np.ndarray,
    *arrays: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    num_shards: int = 1,
    shard_index: int = 0,
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
      num_shards, shard_index: yield only rows ``[i B/n, (i + 1) B/n)`` of every batch, with
        ``n = num_shards`` and ``i = shard_index`` (multi-host: ``jax.process_count()`` and
        ``jax.process_index()``). Only those rows are gathered, so each process loads its slice
        of the global batch; the order is the same on every process.

    Raises:
      ValueError: on a bad ``batch_size``, a shard count that does not divide it, or
        mismatched leading sizes.
    """
    n = len(x)
    for i, a in enumerate(arrays):
        if len(a) != n:
            raise ValueError(f"arrays[{i}] has {len(a)} examples but x has {n}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the dataset size), got {batch_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    if not (isinstance(num_shards, int) and num_shards >= 1 and 0 <= shard_index < num_shards):
        raise ValueError(
            f"num_shards={num_shards!r} must be >= 1 and shard_index={shard_index!r} in "
            f"[0, num_shards)"
        )
    if batch_size % num_shards:
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of num_shards={num_shards} (the process "
            "count): every process must feed the same number of rows"
        )
    if num_shards > 1 and not drop_last:
        raise ValueError("num_shards > 1 needs drop_last=True (equal rows on every process)")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    rows = batch_size // num_shards
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if num_shards > 1:
            idx = idx[shard_index * rows : (shard_index + 1) * rows]
        yield (x[idx], *(a[idx] for a in arrays))


def prefetch_to_mesh(
    batches: Iterable[Any], mesh: Mesh, axis_name: str = "batch", size: int = 2
) -> Iterator[Any]:
    """Yields each (process-local) batch as a global array sharded over ``mesh``, ``size`` ahead.

    Double buffering: the transfer of batch k+1 is started (``jax.device_put`` and friends are
    asynchronous) before batch k is handed out, so with JAX's asynchronous dispatch the host
    gathers and sends the next batch while the device runs the current step. Each leaf's
    leading axis is this process's rows of the global batch (the whole batch on one host);
    see :func:`iterate_batches`' ``num_shards``.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1 (batches in flight), got {size!r}")
    sharding = NamedSharding(mesh, P(axis_name))

    def put(batch):
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch
        )

    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size - 1:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


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
