"""Label noise for the robustness experiments (training split only).

Two kinds, following the protocol summarised in ``docs/algorithms.md`` ("Label noise"):

* **symmetric**: exactly ``round(rate * N)`` training examples, chosen uniformly at random
  without replacement, are moved to a class drawn uniformly from the ``K - 1`` *other*
  classes. Every chosen label therefore really changes, so the realised noise rate equals
  ``rate`` (up to rounding). Some papers instead redraw from all ``K`` classes, which gives an
  effective rate of ``rate * (K - 1) / K``; we follow the "different class" convention that
  ``docs/algorithms.md`` prescribes, so ``rate`` is the true fraction of wrong labels.
* **asymmetric**: class-dependent flips that mimic confusions between similar classes.
  For CIFAR-10 the map of Patrini et al. (2017, "Making deep neural networks robust to label
  noise: a loss correction approach"): truck→automobile (9→1), bird→airplane (2→0),
  deer→horse (4→7), cat↔dog (3↔5). Elsewhere the pair-flip ``c → (c + 1) mod K`` of Han et al.
  (2018, "Co-teaching"). Within every *source* class ``c`` exactly ``round(rate * n_c)``
  examples flip (``n_c`` = examples of class ``c``), instead of flipping each with
  probability ``rate``, so the per-class noise rate is exact and reproducible; classes outside
  the map are untouched. Thus the total number of flips is ``sum_c round(rate * n_c)``.

All functions are deterministic for a seed (``numpy.random.default_rng(seed)``) and return a
fresh ``int32`` array; the input is never modified. They are host-side NumPy (not jittable):
noise is drawn once per run, before training, and saved with it.
"""

from __future__ import annotations

import numbers

import numpy as np

NOISE_KINDS = ("none", "symmetric", "asymmetric")

# Patrini et al. (2017), Sec. 5: TRUCK→AUTOMOBILE, BIRD→AIRPLANE, DEER→HORSE, CAT↔DOG.
CIFAR10_ASYMMETRIC_MAP: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def check_rate_and_seed(rate: float, seed: int, rate_name: str = "rate") -> None:
    """Raises a TypeError/ValueError naming the argument for a bad noise rate or seed.

    A rate must be a real number in ``[0, 1)`` (a string such as ``"0.4"`` is refused rather
    than parsed); a seed a non-negative integer (NumPy's generators reject negative seeds).
    """
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(
            f"{rate_name} must be a number in [0, 1), got {rate!r} ({type(rate).__name__})."
        )
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"{rate_name} must be in [0, 1), got {rate}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int >= 0, got {seed!r} ({type(seed).__name__}).")
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed}.")


def _check(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    check_rate_and_seed(rate, seed)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 for label noise, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int32)


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """Moves exactly ``round(rate * N)`` labels to a uniformly chosen different class.

    Args:
      labels: clean integer labels, shape ``(N,)``.
      rate: fraction of labels to corrupt, in ``[0, 1)``.
      num_classes: number of classes ``K`` (>= 2).
      seed: seed of the NumPy generator; same seed, same noisy labels.

    Returns:
      ``int32`` noisy labels, shape ``(N,)``.
    """
    clean = _check(labels, rate, num_classes, seed)
    noisy = clean.copy()
    rng = np.random.default_rng(seed)
    n_flip = round(rate * clean.size)
    idx = rng.choice(clean.size, size=n_flip, replace=False)
    # An offset uniform on {1, ..., K-1} taken mod K is uniform over the K-1 other classes.
    offset = rng.integers(1, num_classes, size=n_flip)
    noisy[idx] = (clean[idx] + offset) % num_classes
    return noisy


def asymmetric_noise(
    labels: np.ndarray,
    rate: float,
    num_classes: int,
    seed: int,
    dataset: str | None = None,
) -> np.ndarray:
    """Class-dependent label flips: the CIFAR-10 map, or pair-flip ``c → (c+1) mod K``.

    Args:
      labels: clean integer labels, shape ``(N,)``.
      rate: fraction of each source class to flip, in ``[0, 1)``.
      num_classes: number of classes ``K`` (>= 2).
      seed: seed of the NumPy generator.
      dataset: ``"cifar10"`` selects the Patrini et al. (2017) map
        (:data:`CIFAR10_ASYMMETRIC_MAP`); anything else uses pair-flip (Han et al., 2018).

    Returns:
      ``int32`` noisy labels; exactly ``round(rate * n_c)`` examples of every source class
      ``c`` carry the mapped label.
    """
    clean = _check(labels, rate, num_classes, seed)
    if dataset == "cifar10":
        if num_classes != 10:
            raise ValueError(f"the cifar10 noise map needs num_classes=10, got {num_classes}")
        mapping = CIFAR10_ASYMMETRIC_MAP
    else:
        mapping = {c: (c + 1) % num_classes for c in range(num_classes)}
    noisy = clean.copy()
    rng = np.random.default_rng(seed)
    # Sorted order so the draws, and hence the labels, depend only on the seed.
    for src in sorted(mapping):
        members = np.flatnonzero(clean == src)
        chosen = rng.choice(members, size=round(rate * members.size), replace=False)
        noisy[chosen] = mapping[src]
    return noisy


def apply_label_noise(
    labels: np.ndarray,
    noise: str,
    rate: float,
    num_classes: int,
    seed: int,
    dataset: str | None = None,
) -> np.ndarray:
    """Dispatches on ``noise`` in :data:`NOISE_KINDS`; ``"none"`` returns a copy.

    ``noise="none"`` with a non-zero ``rate`` raises, so a typo in a config cannot silently
    train on clean labels.
    """
    if noise == "none":
        check_rate_and_seed(rate, seed)
        if rate != 0.0:
            raise ValueError(f"noise='none' needs noise_rate=0, got {rate}")
        return np.asarray(labels).astype(np.int32)
    if noise == "symmetric":
        return symmetric_noise(labels, rate, num_classes, seed)
    if noise == "asymmetric":
        return asymmetric_noise(labels, rate, num_classes, seed, dataset=dataset)
    raise ValueError(f"unknown noise kind {noise!r}; choose one of {NOISE_KINDS}")
