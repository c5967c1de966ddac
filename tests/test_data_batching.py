"""Batching (determinism, coverage) and crop+flip augmentation (against a brute-force search)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax.data import augment_crop_flip, iterate_batches

X = np.arange(100, dtype=np.float32).reshape(50, 2)
Y = np.arange(50, dtype=np.int32)


def _epoch(seed, epoch, **kw):
    return list(iterate_batches(X, Y, batch_size=10, seed=seed, epoch=epoch, **kw))


def test_batches_deterministic_and_reshuffled():
    a, b = _epoch(0, 0), _epoch(0, 0)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    order = lambda batches: np.concatenate([y for _, y in batches])
    assert not np.array_equal(order(a), order(_epoch(0, 1)))
    assert not np.array_equal(order(a), order(_epoch(1, 0)))


def test_each_example_once_per_epoch_and_rows_aligned():
    batches = _epoch(3, 7)
    assert len(batches) == 5
    ys = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(np.sort(ys), Y)
    for x, y in batches:
        np.testing.assert_array_equal(x, X[y])  # x and y rows stay paired


def test_drop_last_and_no_shuffle():
    kept = list(iterate_batches(X, batch_size=16, seed=0, epoch=0))
    assert [len(b[0]) for b in kept] == [16, 16, 16]
    full = list(iterate_batches(X, batch_size=16, seed=0, epoch=0, shuffle=False, drop_last=False))
    assert [len(b[0]) for b in full] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in full]), X)


def test_bad_batch_size_raises():
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(X, Y, batch_size=51, seed=0, epoch=0))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(X, Y, batch_size=0, seed=0, epoch=0))
    with pytest.raises(ValueError, match="arrays"):
        next(iterate_batches(X, Y[:-1], batch_size=5, seed=0, epoch=0))


def test_crop_flip_is_a_shifted_maybe_flipped_window_of_the_padded_image():
    n, h, w, c, p = 16, 8, 8, 3, 2
    images = jax.random.normal(jax.random.key(0), (n, h, w, c))  # distinct values: no ties
    out = np.asarray(jax.jit(augment_crop_flip, static_argnums=2)(jax.random.key(1), images, p))
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = np.pad(np.asarray(images), ((0, 0), (p, p), (p, p), (0, 0)))
    flips, shifts = [], set()
    for i in range(n):
        found = [
            (dy, dx, f)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for f in (False, True)
            if np.array_equal(
                out[i],
                padded[i, dy : dy + h, dx : dx + w][:, ::-1]
                if f
                else padded[i, dy : dy + h, dx : dx + w],
            )
        ]
        assert len(found) == 1, f"image {i} is not a unique crop of its padded image"
        flips.append(found[0][2])
        shifts.add(found[0][:2])
    assert any(flips) and not all(flips)  # both branches occur with 16 draws
    assert len(shifts) > 1


def test_flip_actually_flips():
    # padding=0 leaves only the flip: each output is the image or its mirror, and with 32
    # copies both occur (a fair coin misses one side with probability 2 * 2**-32).
    image = jnp.arange(4 * 4, dtype=jnp.float32).reshape(4, 4, 1)
    out = np.asarray(augment_crop_flip(jax.random.key(0), jnp.stack([image] * 32), padding=0))
    flipped = np.all(out == np.asarray(image)[:, ::-1], axis=(1, 2, 3))
    same = np.all(out == np.asarray(image), axis=(1, 2, 3))
    assert np.all(flipped | same)
    assert flipped.any() and same.any()
