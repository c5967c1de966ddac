"""Datasets generated in code, deterministic from a seed: nothing is downloaded or cached.

* ``synthetic_cifar``: CIFAR-shaped images ``(N, 32, 32, 3)``, 10 classes, from smooth
  class templates, randomly shifted, scaled and noised (:func:`make_synthetic_cifar`). A
  stand-in for CIFAR-10 where TFDS data is not prepared: same shapes and class count, so every
  image model, augmentation and sharding path runs on it; the numbers it gives are not CIFAR's.
* ``modular_addition``: the algorithmic task of Power et al. (2022, "Grokking: generalization
  beyond overfitting on small algorithmic datasets"): tokens ``[a, b, =]`` with label
  ``(a + b) mod p``, all ``p²`` pairs split into train and test by ``train_fraction``
  (:func:`make_modular_addition`). Operands are tokens ``0..p-1`` and ``=`` is token ``p``, so
  the input vocabulary is ``p + 1`` and the labels are the ``p`` answers.

The functions return raw arrays ``(x_train, y_train, x_test, y_test)``;
:func:`sharpjax.data.load_dataset` normalises the images (tokens are left as they are) and
applies label noise.
"""

from __future__ import annotations

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}.")


def make_synthetic_cifar(
    num_train: int = 5000,
    num_test: int = 1000,
    num_classes: int = 10,
    noise_std: float = 4.0,
    max_shift: int = 8,
    seed: int = 0,
) -> Arrays:
    """CIFAR-shaped images with class structure: template, shift, contrast, noise.

    Each class ``c`` has a smooth template ``T_c`` (a 4x4x3 standard normal grid, upsampled to
    32x32 by bilinear interpolation: low-frequency colour blobs, like object/background
    layouts). Example ``i`` of class ``y_i`` is::

        x_i = a_i * roll(T_{y_i}, (dy_i, dx_i)) + noise_std * n_i

    with contrast ``a_i ~ U(0.5, 1.5)``, a cyclic shift ``dy_i, dx_i ~ U{-max_shift..max_shift}``
    (translation structure a conv or ViT can exploit, a linear model less so) and white noise
    ``n_i ~ N(0, 1)`` per pixel. Labels are balanced (``i mod num_classes``, then shuffled).

    The defaults (noise 4, shifts up to 8 px) leave a linear model well short of the data's
    structure: scikit-learn's ``LogisticRegression`` on 2000 raw training images reaches 100%
    train and 0.73 test accuracy (0.61 at noise 5, 0.86 at noise 3 with these
    shifts; 1.0 at noise 1 with 4 px shifts), so there is room for models that use the
    translation structure and for generalisation to differ between optimizers.

    Args:
      num_train, num_test: number of examples in each split.
      num_classes: number of classes (templates).
      noise_std: per-pixel noise; the templates have unit variance per pixel before
        upsampling.
      max_shift: largest shift in pixels along each axis (0: no shift).
      seed: the whole dataset (templates, shifts, noise, order) is a function of it.

    Returns:
      ``(x_train, y_train, x_test, y_test)``: float32 ``(N, 32, 32, 3)`` and int32 ``(N,)``.
    """
    _check_int("num_train", num_train, 1)
    _check_int("num_test", num_test, 1)
    _check_int("num_classes", num_classes, 2)
    _check_int("max_shift", max_shift, 0)
    _check_int("seed", seed, 0)
    if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or noise_std < 0:
        raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}.")
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((num_classes, 4, 4, 3))
    # Bilinear upsampling 4 → 32 along each axis, as a fixed interpolation matrix.
    pos = np.clip((np.arange(32) + 0.5) / 8 - 0.5, 0, 3)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, 3)
    w = pos - lo
    up = np.zeros((32, 4))
    up[np.arange(32), lo] += 1 - w
    up[np.arange(32), hi] += w
    templates = np.einsum("yi,xj,cijk->cyxk", up, up, coarse)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
        contrast = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
        # Cyclic shift by indexing: pixel (r, c) of the example is the template's
        # (r - dy, c - dx) mod 32, as np.roll would give, without a per-example loop.
        ar = np.arange(32)
        rows = (ar[None, :] - shifts[:, :1]) % 32
        cols = (ar[None, :] - shifts[:, 1:]) % 32
        x = templates[y[:, None, None], rows[:, :, None], cols[:, None, :]].astype(np.float32)
        x *= contrast[:, None, None, None]
        x += noise_std * rng.standard_normal(x.shape, dtype=np.float32)
        return x, y

    x_tr, y_tr = split(num_train)
    x_te, y_te = split(num_test)
    return x_tr, y_tr, x_te, y_te


def make_modular_addition(p: int = 97, train_fraction: float = 0.5, seed: int = 0) -> Arrays:
    """All ``p²`` equations ``a + b = c (mod p)``, shuffled by ``seed`` and split.

    Args:
      p: the modulus (Power et al. use the prime 97); operands and answers are ``0..p-1``.
      train_fraction: share of the ``p²`` pairs used for training (the rest is the test set);
        grokking is studied by varying it (Power et al., Fig. 1: 30-50% for p = 97).
      seed: the shuffle before the split.

    Returns:
      ``(x_train, y_train, x_test, y_test)``: int32 tokens ``(N, 3)`` rows ``[a, b, p]``
      (``p`` is the ``=`` token) and int32 labels ``(a + b) % p``.

    Raises:
      ValueError: ``p < 2``, ``train_fraction`` outside (0, 1), or a split that would be empty.
    """
    _check_int("p", p, 2)
    _check_fraction("train_fraction", train_fraction)
    _check_int("seed", seed, 0)
    a, b = (g.ravel() for g in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
    x = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)
    y = ((a + b) % p).astype(np.int32)
    order = np.random.default_rng(seed).permutation(p * p)
    n_train = round(train_fraction * p * p)
    if not 0 < n_train < p * p:
        raise ValueError(
            f"train_fraction={train_fraction} of p*p={p * p} pairs leaves an empty split; "
            "use a fraction further from 0 and 1 or a larger p."
        )
    tr, te = order[:n_train], order[n_train:]
    return x[tr], y[tr], x[te], y[te]


# load_dataset's generators: name → (function, num_classes(options)).
GENERATED = {
    "synthetic_cifar": (make_synthetic_cifar, lambda o: o.get("num_classes", 10)),
    "modular_addition": (make_modular_addition, lambda o: o.get("p", 97)),
}
