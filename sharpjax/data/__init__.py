"""Datasets, label noise and batching for sharpjax.

Embedded, offline: ``digits`` (scikit-learn) and ``mnist1d`` (generated locally, cached under
``$SHARPJAX_CACHE`` or ``~/.cache/sharpjax``). Generated in code from a seed
(:mod:`sharpjax.data.synthetic`): ``synthetic_cifar`` (CIFAR-shaped class templates + noise) and
``modular_addition`` (tokens ``[a, b, =]``, label ``(a + b) mod p``; Power et al. 2022).
TFDS: ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``svhn_cropped``, read with
``tfds.data_source`` from a directory prepared beforehand in ArrayRecord format; nothing is
ever downloaded. Prepare once, where there is
internet access and TensorFlow (``pip install tensorflow``)::

    tfds build cifar10 --data_dir /path/to/tfds --file_format=array_record

then ``load_dataset("cifar10", data_dir="/path/to/tfds")``. An unprepared dataset raises
:class:`DatasetNotPreparedError` at once, with that command in the message.

Example::

    ds = load_dataset("cifar10", noise="symmetric", noise_rate=0.4, seed=0, data_dir=...)
    for xb, yb in iterate_batches(ds.x_train, ds.y_train, batch_size=128, seed=0, epoch=e):
        xb = augment_crop_flip(key, xb)
"""

from sharpjax.data.batching import augment_crop_flip, iterate_batches, prefetch_to_mesh
from sharpjax.data.dataset import DATASETS, Dataset, load_dataset
from sharpjax.data.noise import (
    CIFAR10_ASYMMETRIC_MAP,
    NOISE_KINDS,
    apply_label_noise,
    asymmetric_noise,
    symmetric_noise,
)
from sharpjax.data.synthetic import make_modular_addition, make_synthetic_cifar
from sharpjax.data.tfds_data import DatasetNotPreparedError

__all__ = [
    "CIFAR10_ASYMMETRIC_MAP",
    "DATASETS",
    "NOISE_KINDS",
    "Dataset",
    "DatasetNotPreparedError",
    "apply_label_noise",
    "asymmetric_noise",
    "augment_crop_flip",
    "iterate_batches",
    "load_dataset",
    "make_modular_addition",
    "make_synthetic_cifar",
    "prefetch_to_mesh",
    "symmetric_noise",
]
