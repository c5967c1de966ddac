"""Per-epoch metrics and the files they go to.

Every epoch appends one JSON line to ``workdir/metrics.jsonl`` with the keys of
:data:`EPOCH_KEYS` (evaluation keys are ``null`` on epochs without evaluation), plus the
optimizer's diagnostics averaged over the epoch's steps under their own names (see
:func:`sharpjax.diagnostics`: ``grad_norm``, ``perturbation_norm``, ``second_grad_norm``,
``cosine``, ``rho``, and e.g. SANER's ``masked_fraction``, ``alpha``, VaSSO's ``d_norm``,
noise-resistant SAM's ``integral_norm``).

Definitions (``N`` training examples, labels ``y`` as used for training, noisy or not):

* ``train_loss``, ``train_accuracy``: means over the epoch's steps, from the clean pass
  (train mode, labels used for training).
* ``train_accuracy_clean``: accuracy of the end-of-epoch model (eval mode) against the clean
  training labels, over the whole training set.
* ``memorization``: accuracy of the end-of-epoch model (eval mode) against the *noisy* labels,
  over the corrupted training examples only; ``null`` when no label is corrupted.
* ``test_loss``, ``test_accuracy``: the end-of-epoch model on the test set.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

EPOCH_KEYS = (
    "epoch",
    "step",
    "learning_rate",
    "train_loss",
    "train_accuracy",
    "train_accuracy_clean",
    "memorization",
    "test_loss",
    "test_accuracy",
    "epoch_time",
)
# Keys whose values depend on the machine's speed, not on the computation.
TIMING_KEYS = ("epoch_time", "train_time")


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example softmax cross-entropy in float64 (host side, for evaluation)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return log_norm - shifted[np.arange(len(labels)), labels]


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``predictions == labels``."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def memorization(
    predictions: np.ndarray, noisy_labels: np.ndarray, clean_labels: np.ndarray
) -> float | None:
    """Fraction of corrupted examples (``noisy != clean``) predicted as their noisy label.

    None when no example is corrupted (there is nothing to memorise).
    """
    noisy_labels, clean_labels = np.asarray(noisy_labels), np.asarray(clean_labels)
    corrupted = noisy_labels != clean_labels
    if not corrupted.any():
        return None
    return float(np.mean(np.asarray(predictions)[corrupted] == noisy_labels[corrupted]))


def to_jsonable(value: Any) -> Any:
    """Python scalars for JSON: numpy/JAX scalars to float/int, NaN and inf to None."""
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    number = float(np.asarray(value))
    return number if math.isfinite(number) else None


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: str, records: list[dict[str, Any]]) -> None:
    """Rewrites a JSON-lines file atomically (used when a resumed run restores its history)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """Appends one JSON line (flushed) to ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
