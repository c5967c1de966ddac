"""Image datasets read from a *prepared* TFDS directory with ``tfds.data_source``.

``tfds.data_source`` gives random access to ArrayRecord files and decodes images with PIL,
so reading needs no TensorFlow. It never downloads here: before touching the data we ask
``tfds.builder(name, data_dir=...).is_prepared()`` (a local check for ``dataset_info.json``;
no network, milliseconds) and raise :class:`DatasetNotPreparedError` with the build command
if the answer is no; ``data_source`` is then called with ``download=False``.

Preparing a dataset (once, on a machine with internet access; *writing* TFDS files encodes
images with TensorFlow, so ``pip install tensorflow`` there first)::

    tfds build cifar10 --data_dir ~/tensorflow_datasets --file_format=array_record

or, equivalently, from Python::

    import tensorflow_datasets as tfds
    tfds.builder("cifar10", data_dir="~/tensorflow_datasets",
                 file_format="array_record").download_and_prepare()

``--file_format=array_record`` matters: the default TFRecord format has no random access and
``data_source`` cannot read it. Copy the resulting ``<data_dir>/cifar10/3.0.2/`` tree to the
training machine and pass ``load_dataset("cifar10", data_dir=...)`` (``data_dir=None`` means
TFDS's default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
"""

from __future__ import annotations

import numpy as np

TFDS_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn_cropped")


class DatasetNotPreparedError(FileNotFoundError):
    """The TFDS dataset is not prepared (in ArrayRecord format) under ``data_dir``."""


def _build_command(name: str, data_dir: str | None) -> str:
    where = data_dir if data_dir is not None else "~/tensorflow_datasets"
    return (
        f"  tfds build {name} --data_dir {where} --file_format=array_record\n"
        f"or in Python (writing TFDS files needs TensorFlow: pip install tensorflow):\n"
        f"  import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{where}', "
        f"file_format='array_record').download_and_prepare()"
    )


def _prepared_builder(name: str, data_dir: str | None):  # -> tfds.core.DatasetBuilder
    """The builder for ``name`` after checking, offline, that its files are readable."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; sharpjax never "
            f"downloads. Prepare it once with\n{_build_command(name, data_dir)}\n"
            f"then pass data_dir=... (see sharpjax.data.tfds_data)."
        )
    formats = {str(getattr(f, "value", f)) for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as {sorted(formats)}, but "
            f"random access needs array_record. Rebuild it with\n"
            f"{_build_command(name, data_dir)}\n"
            f"or convert the existing files: tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record"
        )
    return builder


def read_split(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split fully into memory: ``(uint8 images NHWC, int32 labels)``.

    The only place that touches TFDS data; ``tfds.testing.mock_data`` serves it in tests.
    """
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    first = np.asarray(source[0]["image"]) if len(source) else np.zeros((0, 0, 0), np.uint8)
    images = np.empty((len(source), *first.shape), np.uint8)
    labels = np.empty((len(source),), np.int32)
    # Example by example: every example is decoded anyway, and this keeps peak memory at the
    # final arrays (CIFAR-10 train: 150 MB of uint8).
    for i in range(len(source)):
        example = source[i]
        images[i] = example["image"]
        labels[i] = example["label"]
    return images, labels


def load_tfds_arrays(
    name: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """``(x_train uint8, y_train, x_test uint8, y_test, num_classes)`` for a prepared dataset."""
    if name not in TFDS_DATASETS:
        raise ValueError(f"unknown TFDS dataset {name!r}; choose one of {TFDS_DATASETS}")
    builder = _prepared_builder(name, data_dir)
    num_classes = int(builder.info.features["label"].num_classes)
    x_train, y_train = read_split(name, "train", data_dir)
    x_test, y_test = read_split(name, "test", data_dir)
    return x_train, y_train, x_test, y_test, num_classes
