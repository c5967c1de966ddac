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

Faults:

* the workdir and ``checkpoints/`` are probed with a real write before training, so an
  unwritable location fails at once (PermissionError naming the path), not after an epoch;
* saves are synchronous: a failed save raises :class:`CheckpointError` with the path and the
  cause, and the process can exit at once (an asynchronous orbax save that fails leaves a
  thread that holds the process for minutes at exit);
* a damaged checkpoint (a truncated array file, a missing or malformed meta, ``state/``
  removed) is skipped on resume with a warning and moved to ``checkpoints_damaged/<epoch>``;
  the run resumes from the newest intact one, and only when none is intact does it stop with
  a :class:`CheckpointError` listing each one's cause.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sharpjax.train.config import RUNTIME_FIELDS, TrainConfig

CHECKPOINT_DIR = "checkpoints"
# Damaged checkpoints are moved here (not deleted), so that their epoch can be saved again.
DAMAGED_DIR = "checkpoints_damaged"
RUN_FILES = ("config.json", "labels.npz", "metrics.jsonl", "result.json")


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be restored, or one cannot be written."""


def check_writable(directory: str, what: str) -> None:
    """Creates ``directory`` and writes (then removes) a probe file in it.

    ``os.access`` alone is not enough: it says yes to root on a read-only mount, and a path
    under a regular file fails only when written.

    Raises:
      PermissionError: naming ``what``, the path and the cause.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".sharpjax-write-probe")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"The {what} {directory} cannot be written ({type(e).__name__}: {e.strerror or e}). "
            "Choose a writable workdir, or fix the permissions, before training."
        ) from e


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
        check_writable(workdir, "workdir")
        return False
    with open(config_path) as f:
        saved = json.load(f)
    check_writable(workdir, "workdir")
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
    shutil.rmtree(os.path.join(workdir, DAMAGED_DIR), ignore_errors=True)


class Checkpointer:
    """Orbax checkpoints of a run, one per saved epoch, under ``workdir/checkpoints``.

    ``state`` is a pytree of arrays (params, opt_state, batch_stats, step, rng); ``meta`` is
    JSON (epoch, history, config). Restoring needs a template with the run's structure (a
    freshly initialised state), so optimizer states come back as their own NamedTuples.

    Faults: the directory is checked to be writable on construction; saves are synchronous,
    so a failed save raises :class:`CheckpointError` at once (orbax's asynchronous saves
    make a failed save hang the process for minutes at exit); :meth:`restore_latest` skips
    damaged checkpoints.
    """

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        check_writable(self.directory, "checkpoint directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_epoch(self) -> int | None:
        """The epoch of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves and returns once the checkpoint is on disk.

        Raises:
          CheckpointError: the save failed (the message has the path and the cause).
        """
        try:
            self.manager.save(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self.manager.wait_until_finished()
        except Exception as e:
            path = os.path.join(self.directory, str(epoch))
            raise CheckpointError(
                f"Saving the checkpoint of epoch {epoch} to {path} failed: {type(e).__name__}: {e}"
            ) from e

    def restore(self, epoch: int, template: Any) -> tuple[Any, dict[str, Any]]:
        """The state (with the template's structure, dtypes and shapes) and meta of ``epoch``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        meta = restored["meta"]
        if not isinstance(meta, dict) or not {"epoch", "history"} <= set(meta):
            raise ValueError(f"its meta is not a dict with 'epoch' and 'history': {meta!r:.200}")
        state = jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), restored["state"], template)
        return state, meta

    def restore_latest(self, template: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """``(epoch, state, meta)`` of the newest checkpoint that restores, or None if none.

        Newer checkpoints that fail to restore (a truncated or missing file, bad meta JSON, a
        missing item) are moved to ``workdir/checkpoints_damaged/<epoch>`` (so that training
        can save those epochs again) with a warning naming each one and its cause.

        Raises:
          CheckpointError: there are checkpoints but none restores (each one's cause listed;
            nothing is moved, so every later attempt fails the same way).
        """
        damaged: list[tuple[int, str]] = []
        for epoch in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(epoch, template)
            except Exception as e:  # tensorstore, JSON, orbax, KeyError: all mean damaged
                lines = str(e).strip().splitlines() or [""]
                damaged.append((epoch, f"{type(e).__name__}: {lines[0][:300]}"))
                continue
            for bad, cause in damaged:
                moved = self._set_aside(bad)
                warnings.warn(
                    f"Checkpoint {os.path.join(self.directory, str(bad))} is damaged and was "
                    f"skipped ({cause}); moved to {moved}. Resuming from epoch {epoch}.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return epoch, state, meta
        if damaged:
            causes = "; ".join(f"epoch {epoch}: {cause}" for epoch, cause in damaged)
            raise CheckpointError(
                f"No checkpoint in {self.directory} can be restored ({causes}). To train this "
                "run from scratch, delete that directory (or choose another workdir)."
            )
        return None

    def _set_aside(self, epoch: int) -> str:
        """Moves a damaged checkpoint out of the manager's directory; returns where."""
        target = os.path.join(self.workdir, DAMAGED_DIR, str(epoch))
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(epoch)), target)
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
