"""Orbax checkpoints of a run, and the rules that protect a workdir.

Layout of a workdir::

    config.json        the full TrainConfig (written at start)
    labels.npz         the training labels used (noisy) and the clean ones
    metrics.jsonl      one line per finished epoch
    result.json        the final results, written atomically once the run is complete
    checkpoints/<epoch>/   orbax: ``state`` (params, opt_state, batch_stats, step, rng) and
                           ``meta`` (epoch, metrics history, config) as JSON

Rules (:func:`prepare_workdir`):

* a workdir whose ``config.json`` differs from the new config in a field that changes the
  trajectory (anything but :data:`~sharpjax.train.config.RUNTIME_FIELDS`) is refused with a
  ValueError listing the differences; nothing is touched;
* a workdir holding run files (metrics, results, checkpoints) but no ``config.json`` is
  refused: it was not written by this loop;
* a finished run (``result.json`` present) is refused with FileExistsError unless
  ``overwrite=True``, which deletes that run's files (config, labels, metrics, result,
  checkpoints; nothing else) and starts over;
* otherwise the run resumes from the latest checkpoint, if any. Everything random in a run is
  a function of ``(seed, step)`` or ``(seed, epoch)``, so a resumed run is bit-identical on
  CPU to one that was never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sharpjax.train.config import RUNTIME_FIELDS, TrainConfig

CHECKPOINT_DIR = "checkpoints"
RUN_FILES = ("config.json", "labels.npz", "metrics.jsonl", "result.json")


def config_differences(saved: dict[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields (other than runtime ones) whose saved value differs: ``{name: (saved, new)}``."""
    new = json.loads(json.dumps(config.to_dict()))  # the JSON round trip the saved one had
    keys = (set(saved) | set(new)) - set(RUNTIME_FIELDS)
    missing = "<missing>"
    return {
        k: (saved.get(k, missing), new.get(k, missing))
        for k in sorted(keys)
        if saved.get(k, missing) != new.get(k, missing)
    }


def prepare_workdir(config: TrainConfig) -> bool:
    """Checks ``config.workdir`` against the rules above and creates it.

    Returns:
      True when the workdir holds an unfinished compatible run (it may have a checkpoint to
      resume from), False when the run starts fresh.

    Raises:
      ValueError: the saved config is incompatible with ``config`` (nothing is changed).
      FileExistsError: the workdir holds a finished run and ``overwrite`` is False.
    """
    workdir = os.path.abspath(config.workdir)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        ours = [name for name in (*RUN_FILES, CHECKPOINT_DIR) if name != "config.json"]
        found = [name for name in ours if os.path.exists(os.path.join(workdir, name))]
        if found:
            raise ValueError(
                f"{workdir} has {', '.join(found)} but no config.json: it was not written by "
                "sharpjax.train (or is damaged); nothing was changed. Choose another workdir."
            )
        os.makedirs(workdir, exist_ok=True)
        return False
    with open(config_path) as f:
        saved = json.load(f)
    finished = os.path.exists(os.path.join(workdir, "result.json"))
    if finished and config.overwrite:
        remove_run(workdir)
        return False
    differences = config_differences(saved, config)
    if differences:
        lines = "\n".join(
            f"  {k}: saved {a!r}, requested {b!r}" for k, (a, b) in differences.items()
        )
        raise ValueError(
            f"The workdir {workdir} holds a run with an incompatible config:\n{lines}\n"
            "Use another workdir (or overwrite=True once that run is finished)."
        )
    if finished:
        raise FileExistsError(
            f"{workdir} holds a finished run (result.json). Its results are kept: use another "
            "workdir, or overwrite=True to delete that run and train again."
        )
    return True


def remove_run(workdir: str) -> None:
    """Deletes the files of a sharpjax run in ``workdir`` (and only those)."""
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(os.path.join(workdir, CHECKPOINT_DIR), ignore_errors=True)


class Checkpointer:
    """Orbax checkpoints of a run, one per saved epoch, under ``workdir/checkpoints``.

    ``state`` is a pytree of arrays (params, opt_state, batch_stats, step, rng); ``meta`` is
    JSON (epoch, history, config). Restoring needs a template with the run's structure (a
    freshly initialised state), so optimizer states come back as their own NamedTuples.
    """

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_epoch(self) -> int | None:
        """The epoch of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves and waits until the checkpoint is on disk."""
        self.manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, epoch: int, template: Any) -> tuple[Any, dict[str, Any]]:
        """The state (with the template's structure, dtypes and shapes) and meta of ``epoch``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        state = jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), restored["state"], template)
        return state, restored["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
