"""Label noise: exact counts, targets, the CIFAR-10 map, determinism, validation."""

import numpy as np
import pytest

from sharpjax.data import (
    CIFAR10_ASYMMETRIC_MAP,
    apply_label_noise,
    asymmetric_noise,
    symmetric_noise,
)

K = 10
# 1000 examples per class, in a scrambled order so nothing depends on sortedness.
CLEAN = np.random.default_rng(123).permutation(np.repeat(np.arange(K), 1000)).astype(np.int64)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37, 0.8])
def test_symmetric_exact_count_and_never_same(rate):
    noisy = symmetric_noise(CLEAN, rate, K, seed=0)
    changed = noisy != CLEAN
    assert changed.sum() == round(rate * CLEAN.size)
    assert noisy.dtype == np.int32 and noisy.shape == CLEAN.shape
    assert noisy.min() >= 0 and noisy.max() < K


def test_symmetric_targets_uniform_over_other_classes():
    noisy = symmetric_noise(CLEAN, 0.8, K, seed=1)
    changed = noisy != CLEAN
    # Offsets (new - old) mod K must be uniform on {1..K-1}: 8000 draws, 888.9 expected each;
    # a binomial sd is ~28, so +-150 (> 5 sd) never fails by chance yet catches a bias.
    offsets = (noisy[changed] - CLEAN[changed]) % K
    counts = np.bincount(offsets, minlength=K)
    assert counts[0] == 0
    expected = changed.sum() / (K - 1)
    assert np.all(np.abs(counts[1:] - expected) < 150), counts
    # And per source class the targets cover every other class.
    for c in range(K):
        targets = np.unique(noisy[changed & (c == CLEAN)])
        assert set(targets) == set(range(K)) - {c}


def test_symmetric_deterministic_and_seed_dependent():
    a = symmetric_noise(CLEAN, 0.3, K, seed=5)
    b = symmetric_noise(CLEAN, 0.3, K, seed=5)
    c = symmetric_noise(CLEAN, 0.3, K, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_input_not_modified():
    before = CLEAN.copy()
    symmetric_noise(CLEAN, 0.5, K, seed=0)
    asymmetric_noise(CLEAN, 0.5, K, seed=0, dataset="cifar10")
    np.testing.assert_array_equal(CLEAN, before)


@pytest.mark.parametrize("rate", [0.2, 0.45])
def test_asymmetric_cifar10_follows_map_exactly(rate):
    noisy = asymmetric_noise(CLEAN, rate, K, seed=0, dataset="cifar10")
    expected_map = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck→automobile, bird→airplane, ...
    assert expected_map == CIFAR10_ASYMMETRIC_MAP
    changed = noisy != CLEAN
    for c in range(K):
        in_c = c == CLEAN
        if c in expected_map:
            assert changed[in_c].sum() == round(rate * in_c.sum())
            assert np.all(noisy[in_c & changed] == expected_map[c])
        else:
            assert not changed[in_c].any()


def test_asymmetric_pair_flip_elsewhere():
    k = 7
    clean = np.repeat(np.arange(k), 50)
    noisy = asymmetric_noise(clean, 0.3, k, seed=3)
    changed = noisy != clean
    np.testing.assert_array_equal(noisy[changed], (clean[changed] + 1) % k)
    for c in range(k):
        assert changed[clean == c].sum() == round(0.3 * 50)
    # Deterministic for a seed, different for another.
    np.testing.assert_array_equal(noisy, asymmetric_noise(clean, 0.3, k, seed=3))
    assert not np.array_equal(noisy, asymmetric_noise(clean, 0.3, k, seed=4))


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_rates_raise(rate):
    with pytest.raises(ValueError, match="rate"):
        symmetric_noise(CLEAN, rate, K, seed=0)
    with pytest.raises(ValueError, match="rate"):
        asymmetric_noise(CLEAN, rate, K, seed=0)


@pytest.mark.parametrize(
    "rate, seed, error, match",
    [
        ("0.2", 0, TypeError, "rate must be a number"),
        (None, 0, TypeError, "rate must be a number"),
        (0.2, -3, ValueError, "seed must be an int >= 0, got -3"),
        (0.2, "0", TypeError, "seed must be an int"),
    ],
)
def test_bad_rate_or_seed_named(rate, seed, error, match):
    for fn in (symmetric_noise, asymmetric_noise):
        with pytest.raises(error, match=match):
            fn(CLEAN, rate, K, seed=seed)
    with pytest.raises(error, match=match):
        apply_label_noise(CLEAN, "none", rate, K, seed=seed)


def test_bad_kind_and_labels_raise():
    with pytest.raises(ValueError, match="symmetric"):
        apply_label_noise(CLEAN, "uniform", 0.1, K, seed=0)
    with pytest.raises(ValueError, match="noise_rate=0"):
        apply_label_noise(CLEAN, "none", 0.1, K, seed=0)
    with pytest.raises(ValueError, match="labels"):
        symmetric_noise(np.array([0, 10]), 0.1, K, seed=0)
