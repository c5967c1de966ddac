"""load_dataset: embedded datasets, the mnist1d cache, and TFDS through its offline mock."""

import socket

import mnist1d.data
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits
from tensorflow_datasets.core import splits as splits_lib

from sharpjax.data import DATASETS, Dataset, DatasetNotPreparedError, embedded, load_dataset


def _check_common(ds: Dataset, num_classes: int):
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    for y in (ds.y_train, ds.y_train_clean, ds.y_test):
        assert y.dtype == np.int32 and y.min() >= 0 and y.max() < num_classes
    assert ds.num_classes == num_classes
    assert len(ds.x_train) == len(ds.y_train) == len(ds.y_train_clean)
    assert len(ds.x_test) == len(ds.y_test)


def test_digits():
    ds = load_dataset("digits")
    _check_common(ds, 10)
    assert ds.x_train.shape == (1347, 8, 8, 1) and ds.x_test.shape == (450, 8, 8, 1)
    assert ds.input_shape == (8, 8, 1)
    # Stratified: each class keeps its share (25% of its examples, up to rounding) in test.
    per_class = np.bincount(load_digits().target, minlength=10)
    assert np.all(np.abs(np.bincount(ds.y_test, minlength=10) - 0.25 * per_class) <= 1)
    np.testing.assert_allclose(ds.x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(), 1.0, atol=1e-4)
    assert not ds.noisy_mask.any()


def test_digits_noise_only_on_train_and_split_fixed():
    clean = load_dataset("digits")
    noisy = load_dataset("digits", noise="symmetric", noise_rate=0.2, seed=3)
    assert noisy.noisy_mask.sum() == round(0.2 * 1347)
    np.testing.assert_array_equal(noisy.y_train_clean, clean.y_train)
    np.testing.assert_array_equal(noisy.y_test, clean.y_test)  # test labels stay clean
    np.testing.assert_array_equal(noisy.x_test, clean.x_test)  # split does not move with seed
    assert (noisy.noise, noisy.noise_rate, noisy.seed) == ("symmetric", 0.2, 3)


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """One generation of MNIST-1D into a private cache dir (about 3 s), shared by the tests."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHARPJAX_CACHE", str(cache))
        np.random.seed(1234)
        state_before = np.random.get_state()[1].copy()
        ds = load_dataset("mnist1d", noise="asymmetric", noise_rate=0.2, seed=0)
        state_after = np.random.get_state()[1].copy()
        yield cache, ds, state_before, state_after


def test_mnist1d_shapes_and_classes(mnist1d_cache):
    _, ds, _, _ = mnist1d_cache
    _check_common(ds, 10)
    assert ds.x_train.shape == (4000, 40, 1) and ds.x_test.shape == (1000, 40, 1)
    assert set(np.unique(ds.y_test)) == set(range(10))
    np.testing.assert_allclose(ds.x_train.mean(), 0.0, atol=1e-5)
    # Pair-flip: every changed label is the next class.
    m = ds.noisy_mask
    np.testing.assert_array_equal(ds.y_train[m], (ds.y_train_clean[m] + 1) % 10)


def test_mnist1d_generation_leaves_global_rng_alone(mnist1d_cache):
    _, _, before, after = mnist1d_cache
    np.testing.assert_array_equal(before, after)


def test_mnist1d_cache_created_and_reused(mnist1d_cache, monkeypatch):
    cache, first, _, _ = mnist1d_cache
    files = list(cache.glob("mnist1d_*.npz"))
    assert len(files) == 1
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temporary behind
    monkeypatch.setenv("SHARPJAX_CACHE", str(cache))

    def no_generation(*args, **kwargs):
        raise AssertionError("mnist1d was regenerated instead of read from the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = load_dataset("mnist1d", noise="asymmetric", noise_rate=0.2, seed=0)
    for field in ("x_train", "y_train", "y_train_clean", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, field), getattr(first, field))


@pytest.mark.parametrize("damage", ["truncated", "not_a_zip"])
def test_mnist1d_damaged_cache_is_regenerated(mnist1d_cache, tmp_path, monkeypatch, damage):
    cache, first, _, _ = mnist1d_cache
    (good,) = cache.glob("mnist1d_*.npz")
    bad = tmp_path / good.name
    data = good.read_bytes()
    # A half-written archive (a writer killed without the atomic rename) or a foreign file.
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an npz")
    monkeypatch.setenv("SHARPJAX_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="damaged.*regenerating"):
        again = load_dataset("mnist1d", noise="asymmetric", noise_rate=0.2, seed=0)
    for field in ("x_train", "y_train", "y_train_clean", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
    with np.load(bad) as f:  # the cache was rewritten whole
        np.testing.assert_array_equal(f["y_test"], first.y_test)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"noise_rate": "0.4"}, TypeError, "noise_rate must be a number"),
        ({"noise_rate": True}, TypeError, "noise_rate must be a number"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0, got -1"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
    ],
)
def test_bad_noise_rate_or_seed_named(kwargs, error, match, monkeypatch):
    def no_loading(*args, **kw):
        raise AssertionError("data was loaded before the arguments were checked")

    monkeypatch.setattr(embedded, "load_digits_arrays", no_loading)
    with pytest.raises(error, match=match):
        load_dataset("digits", **{"noise": "symmetric", "noise_rate": 0.2, **kwargs})


def test_unknown_names_list_choices():
    with pytest.raises(ValueError, match="cifar10") as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(ValueError, match="asymmetric"):
        load_dataset("digits", noise="pairflip", noise_rate=0.1)
    with pytest.raises(ValueError, match="noise_rate"):
        load_dataset("digits", noise="symmetric", noise_rate=1.0)


# --- TFDS -------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any socket use fails at once, so a test cannot pass by downloading or hang on one."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _write_metadata(data_dir, name, n_train, n_test, file_format="array_record"):
    """What `tfds build` leaves besides the data shards: dataset_info.json and features.json.

    With these files the dataset counts as prepared (builder.is_prepared() is a check for
    dataset_info.json), so load_dataset goes past its check exactly as with real data, and
    tfds.testing.mock_data(data_dir=...) then serves random examples in place of the
    ArrayRecord shards to tfds.data_source.
    """
    builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
    builder.info.set_splits(
        splits_lib.SplitDict(
            [
                splits_lib.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
                for s, n in (("train", n_train), ("test", n_test))
            ]
        )
    )
    path = builder.data_path
    path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(path)


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
        ("mnist", (28, 28, 1), 10),
        ("fashion_mnist", (28, 28, 1), 10),
        ("svhn_cropped", (32, 32, 3), 10),
    ],
)
def test_tfds_through_mock(tmp_path, no_network, name, shape, classes):
    _write_metadata(tmp_path, name, 24, 8)
    with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
        ds = load_dataset(name, data_dir=str(tmp_path), noise="symmetric", noise_rate=0.25)
    _check_common(ds, classes)
    assert ds.x_train.shape == (24, *shape) and ds.x_test.shape[1:] == shape
    # Per-channel standardisation with training statistics.
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    assert ds.noisy_mask.sum() == round(0.25 * 24)


def test_cifar10_asymmetric_through_mock(tmp_path, no_network):
    _write_metadata(tmp_path, "cifar10", 64, 8)
    with tfds.testing.mock_data(num_examples=64, data_dir=str(tmp_path)):
        ds = load_dataset("cifar10", data_dir=str(tmp_path), noise="asymmetric", noise_rate=0.5)
    m = ds.noisy_mask
    mapping = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    assert m.any()
    assert all(mapping[c] == t for c, t in zip(ds.y_train_clean[m], ds.y_train[m], strict=True))


def test_unprepared_tfds_raises_with_build_command(tmp_path, no_network):
    with pytest.raises(DatasetNotPreparedError, match="tfds build cifar10") as err:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert str(tmp_path) in str(err.value) and "array_record" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or created


def test_tfrecord_only_tfds_raises_naming_array_record(tmp_path, no_network):
    _write_metadata(tmp_path, "mnist", 4, 4, file_format="tfrecord")
    with pytest.raises(DatasetNotPreparedError, match="array_record"):
        load_dataset("mnist", data_dir=str(tmp_path))
