"""Offline datasets: scikit-learn's digits and MNIST-1D, plus the ``.npz`` cache.

* digits: ``sklearn.datasets.load_digits`` (1797 8x8 grey images, 10 classes, pixel values
  0..16; Alpaydin & Kaynak, UCI "Optical Recognition of Handwritten Digits"). Ships with
  scikit-learn, no download.
* MNIST-1D (Greydanus & Kobak, 2024, "Scaling down deep learning with MNIST-1D"): generated
  locally with ``mnist1d.data.make_dataset(get_dataset_args())`` (5000 sequences of length 40,
  4000 train / 1000 test, seed 42), the same procedure that produced the published pickle.
  ``mnist1d.data.get_dataset()`` is never called: it downloads that pickle.

Generated arrays are cached as ``.npz`` under ``$SHARPJAX_CACHE`` or ``~/.cache/sharpjax``.
The functions here return *raw* arrays; normalisation and noise happen in ``load_dataset``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def cache_dir() -> Path:
    """``$SHARPJAX_CACHE`` if set, else ``~/.cache/sharpjax`` (created on demand)."""
    path = Path(os.environ.get("SHARPJAX_CACHE") or Path.home() / ".cache" / "sharpjax")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Writes ``arrays`` to ``path`` via a temporary file and ``os.replace``.

    A reader (another process training in parallel) then sees either no file or a complete
    one, never a half-written archive.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_digits_arrays(test_fraction: float = 0.25, split_seed: int = 0) -> Arrays:
    """digits as ``(x_train, y_train, x_test, y_test)``; x in ``[0, 1]``, shape (N, 8, 8, 1).

    The split is stratified and fixed by ``split_seed`` (not by the noise seed), so runs with
    different noise seeds share one test set. The default gives 1347 train / 450 test.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap), hence /16.
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    return x_tr, y_tr, x_te, y_te


def _mnist1d_cache_path() -> Path:
    import mnist1d
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    # Key the cache on the package version and the generation arguments, so a changed
    # recipe can never be served a stale file.
    blob = json.dumps(
        {"version": getattr(mnist1d, "__version__", "?"), "args": args}, sort_keys=True, default=str
    )
    return cache_dir() / f"mnist1d_{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"


def load_mnist1d_arrays() -> Arrays:
    """MNIST-1D as ``(x_train, y_train, x_test, y_test)``; x float32 (N, 40, 1).

    Generated on first use (about 3 s) and then read from the cache; a damaged cache file is
    regenerated (with a warning).
    """
    path = _mnist1d_cache_path()
    if path.exists():
        try:
            with np.load(path) as f:
                return f["x_train"], f["y_train"], f["x_test"], f["y_test"]
        except (zipfile.BadZipFile, EOFError, KeyError, OSError, ValueError) as e:
            # A damaged cache (a crash of another writer, a full disk) is only a cache.
            warnings.warn(
                f"The cached MNIST-1D file {path} is damaged ({type(e).__name__}: {e}); "
                "regenerating it.",
                RuntimeWarning,
                stacklevel=2,
            )

    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the *global* `random` and `np.random` generators (set_seed(42));
    # restore them so loading data does not change the caller's random streams.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {
        "x_train": raw["x"].astype(np.float32)[..., None],
        "y_train": raw["y"].astype(np.int32),
        "x_test": raw["x_test"].astype(np.float32)[..., None],
        "y_test": raw["y_test"].astype(np.int32),
    }
    save_npz_atomic(path, **arrays)
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
