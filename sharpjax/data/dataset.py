"""The :class:`Dataset` container and :func:`load_dataset`, the one entry point.

Everything is loaded fully into host memory as NumPy arrays (the largest, SVHN train, is about
0.9 GB as float32). Inputs are float32 and normalised with *training-set* statistics only:
per channel for images (the usual CIFAR recipe), one scalar for the single-channel embedded
sets. Label noise (see :mod:`sharpjax.data.noise`) touches the training labels only and is
fixed by ``seed``; ``y_train_clean`` keeps the truth so memorisation can be measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from sharpjax.data import embedded, synthetic, tfds_data
from sharpjax.data.noise import NOISE_KINDS, apply_label_noise, check_rate_and_seed

DATASETS = (
    "digits",
    "mnist1d",
    "synthetic_cifar",
    "modular_addition",
    "cifar10",
    "cifar100",
    "mnist",
    "fashion_mnist",
    "svhn_cropped",
)


# eq=False: field-wise == on arrays is ambiguous; identity equality is what makes sense here.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split held in memory.

    Attributes:
      name: one of :data:`DATASETS`.
      x_train: float32 normalised inputs (images NHWC, mnist1d ``(N, 40, 1)``), or int32
        tokens ``(N, T)`` for sequence tasks (``modular_addition``), left unnormalised.
      y_train: int32 labels used for training (noisy if noise was applied).
      y_train_clean: int32 true training labels.
      x_test: float32 inputs, normalised with the training statistics.
      y_test: int32 clean test labels.
      num_classes: number of classes.
      noise: noise kind, one of :data:`~sharpjax.data.noise.NOISE_KINDS`.
      noise_rate: requested noise rate.
      seed: seed the noise was drawn with.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    y_train_clean: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    noise: str = "none"
    noise_rate: float = 0.0
    seed: int = 0

    @property
    def noisy_mask(self) -> np.ndarray:
        """Boolean ``(N_train,)``: True where the training label was corrupted."""
        return self.y_train != self.y_train_clean

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(32, 32, 3)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.x_train)

    @property
    def num_test(self) -> int:
        return len(self.x_test)


def _standardise(
    x_train: np.ndarray, x_test: np.ndarray, axes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Subtracts the training mean and divides by the training std over ``axes``."""
    # float64 accumulation: a float32 sum over 1.5e8 CIFAR pixels loses digits.
    mean = x_train.mean(axis=axes, dtype=np.float64, keepdims=True)
    std = x_train.std(axis=axes, dtype=np.float64, keepdims=True)
    std = np.where(std > 0, std, 1.0)  # constant inputs (e.g. a tiny mock) stay finite
    norm = lambda x: ((x - mean) / std).astype(np.float32)
    return norm(x_train), norm(x_test)


def load_dataset(
    name: str,
    *,
    noise: str = "none",
    noise_rate: float = 0.0,
    seed: int = 0,
    data_dir: str | None = None,
    test_fraction: float = 0.25,
    options: Mapping[str, Any] | None = None,
) -> Dataset:
    """Loads a dataset, normalises it and applies training-label noise.

    Args:
      name: one of :data:`DATASETS`. ``digits`` and ``mnist1d`` work offline; the others
        must be prepared TFDS datasets (see :mod:`sharpjax.data.tfds_data`).
      noise: ``"none"``, ``"symmetric"`` or ``"asymmetric"`` (CIFAR-10 class map, pair-flip
        elsewhere).
      noise_rate: fraction of training labels to corrupt, in ``[0, 1)``.
      seed: seed of the label noise (not of the data split).
      data_dir: TFDS data directory; ``None`` means TFDS's default. Ignored by the embedded
        datasets.
      test_fraction: held-out fraction for ``digits`` (stratified, fixed split; 0.25 gives
        1347/450). Ignored otherwise: the other datasets have official test splits.
      options: keyword arguments of the generator of a dataset made in code
        (:mod:`sharpjax.data.synthetic`): ``synthetic_cifar`` takes those of
        ``make_synthetic_cifar`` (``num_train``, ``noise_std``, ``seed``, ...),
        ``modular_addition`` those of ``make_modular_addition`` (``p``, ``train_fraction``,
        ``seed``). Their ``seed`` fixes the data; ``seed`` above only the label noise.

    Raises:
      ValueError: unknown ``name`` or ``noise``, ``noise_rate`` outside ``[0, 1)``, a
        negative ``seed``, or ``options`` for a dataset that is not generated.
      TypeError: ``noise_rate`` not a number or ``seed`` not an int.
      DatasetNotPreparedError: a TFDS dataset is not prepared under ``data_dir``; raised
        before any data access, and no download is ever attempted.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {noise!r}; choose one of {NOISE_KINDS}")
    # Before any data is read or generated: a bad argument fails at once, by its name.
    check_rate_and_seed(noise_rate, seed, rate_name="noise_rate")
    options = dict(options or {})
    if options and name not in synthetic.GENERATED:
        raise ValueError(
            f"options={options} is only for the generated datasets "
            f"{tuple(synthetic.GENERATED)}; dataset {name!r} takes none."
        )

    if name in synthetic.GENERATED:
        make, classes = synthetic.GENERATED[name]
        try:
            x_tr, y_tr, x_te, y_te = make(**options)
        except TypeError as e:  # an unknown option: name it and the function's arguments
            raise ValueError(f"options for dataset {name!r}: {e}") from e
        num_classes = classes(options)
        # Tokens are symbols, not intensities: no normalisation.
        axes = (0, 1, 2) if x_tr.ndim == 4 else None
    elif name == "digits":
        x_tr, y_tr, x_te, y_te = embedded.load_digits_arrays(test_fraction)
        num_classes, axes = 10, (0, 1, 2, 3)
    elif name == "mnist1d":
        x_tr, y_tr, x_te, y_te = embedded.load_mnist1d_arrays()
        num_classes, axes = 10, (0, 1, 2)
    else:
        x_tr, y_tr, x_te, y_te, num_classes = tfds_data.load_tfds_arrays(name, data_dir)
        x_tr, x_te = x_tr.astype(np.float32) / 255.0, x_te.astype(np.float32) / 255.0
        axes = (0, 1, 2)  # per channel
    if axes is not None:
        x_tr, x_te = _standardise(x_tr, x_te, axes)

    y_clean = y_tr.astype(np.int32)
    y_noisy = apply_label_noise(y_clean, noise, noise_rate, num_classes, seed, dataset=name)
    return Dataset(
        name=name,
        x_train=x_tr,
        y_train=y_noisy,
        y_train_clean=y_clean,
        x_test=x_te,
        y_test=y_te.astype(np.int32),
        num_classes=num_classes,
        noise=noise,
        noise_rate=float(noise_rate),
        seed=seed,
    )
