"""Generated datasets: determinism, shapes, label ranges, the modular-addition labels written
out, class structure of synthetic CIFAR, and their registration in load_dataset."""

import numpy as np
import pytest

from sharpjax.data import DATASETS, load_dataset, make_modular_addition, make_synthetic_cifar

SMALL = dict(num_train=200, num_test=50)


def test_synthetic_cifar_shapes_labels_and_determinism():
    first = make_synthetic_cifar(**SMALL, seed=3)
    again = make_synthetic_cifar(**SMALL, seed=3)
    other = make_synthetic_cifar(**SMALL, seed=4)
    x_tr, y_tr, x_te, y_te = first
    assert x_tr.shape == (200, 32, 32, 3) and x_te.shape == (50, 32, 32, 3)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32 and y_te.dtype == np.int32
    # Balanced: 200 = 20 per class; labels in 0..9.
    np.testing.assert_array_equal(np.bincount(y_tr, minlength=10), np.full(10, 20))
    assert y_te.min() >= 0 and y_te.max() < 10
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_synthetic_cifar_classes_are_separable_without_shift_or_much_noise():
    # The class structure is real: with no shifts and low noise, the nearest training-class
    # mean labels held-out images correctly (the margin, a template distance of ~sqrt(3072),
    # dwarfs the noise; with the defaults the task is harder, see the docstring).
    x_tr, y_tr, x_te, y_te = make_synthetic_cifar(**SMALL, noise_std=0.5, max_shift=0)
    means = np.stack([x_tr[y_tr == c].mean(0) for c in range(10)]).reshape(10, -1)
    dist = ((x_te.reshape(50, 1, -1) - means[None]) ** 2).sum(-1)
    assert np.mean(dist.argmin(1) == y_te) > 0.9


def test_modular_addition_labels_tokens_and_split():
    p = 13
    x_tr, y_tr, x_te, y_te = make_modular_addition(p=p, train_fraction=0.3, seed=1)
    assert x_tr.shape == (round(0.3 * p * p), 3) and len(x_tr) + len(x_te) == p * p
    x, y = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    assert x.dtype == np.int32 and y.dtype == np.int32
    # Every pair once, across the two splits.
    assert len({(a, b) for a, b, _ in x.tolist()}) == p * p
    assert np.all(x[:, 2] == p)  # the "=" token
    for (a, b, _), c in zip(x.tolist(), y.tolist(), strict=True):
        assert c == (a + b) % p
    again = make_modular_addition(p=p, train_fraction=0.3, seed=1)
    np.testing.assert_array_equal(again[0], x_tr)
    assert not np.array_equal(make_modular_addition(p=p, train_fraction=0.3, seed=2)[0], x_tr)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1}, "p must be an int >= 2"),
        ({"train_fraction": 1.0}, "train_fraction must be a number in \\(0, 1\\)"),
        ({"p": 2, "train_fraction": 0.01}, "empty split"),
    ],
)
def test_modular_addition_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_modular_addition(**kwargs)


def test_load_dataset_generated():
    assert {"synthetic_cifar", "modular_addition"} <= set(DATASETS)
    images = load_dataset("synthetic_cifar", options={**SMALL, "seed": 3})
    assert images.x_train.shape == (200, 32, 32, 3) and images.num_classes == 10
    # Normalised per channel with the training statistics.
    np.testing.assert_allclose(images.x_train.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(images.x_train.std((0, 1, 2)), 1.0, atol=1e-4)

    tokens = load_dataset(
        "modular_addition",
        noise="symmetric",
        noise_rate=0.2,
        seed=5,
        options={"p": 11, "train_fraction": 0.5},
    )
    raw = make_modular_addition(p=11, train_fraction=0.5)
    assert tokens.num_classes == 11 and tokens.input_shape == (3,)
    np.testing.assert_array_equal(tokens.x_train, raw[0])  # tokens are not normalised
    np.testing.assert_array_equal(tokens.y_train_clean, raw[1])
    np.testing.assert_array_equal(tokens.y_test, raw[3])
    assert tokens.noisy_mask.sum() == round(0.2 * len(raw[1]))
    assert tokens.y_train.max() < 11


def test_load_dataset_options_errors():
    with pytest.raises(ValueError, match=r"options for dataset 'modular_addition'.*modulus"):
        load_dataset("modular_addition", options={"modulus": 7})
    with pytest.raises(ValueError, match="only for the generated datasets"):
        load_dataset("digits", options={"p": 7})
