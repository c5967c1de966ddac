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
  ``overwrite=True`` (``--overwrite``), which deletes that run's files (config, labels,
  metrics, result, checkpoints; nothing else) and starts over;
* otherwise the run resumes from the latest checkpoint, if any: to resume, run the same
  config (the same command) with the same workdir again. Everything random in a run is a
  function of ``(seed, step)`` or ``(seed, epoch)``, so a resumed run is bit-identical on CPU
  to one that was never interrupted;
* one trainer at a time: ``.sharpjax.lock`` in the workdir holds the PID, host and start time
  of the trainer that uses it, and a second trainer is refused (:class:`WorkdirInUseError`)
  with that file's path and the first one's PID. The lock is an ``flock`` on the file where
  the file system has one (the kernel drops it when the process dies, however it dies);
  elsewhere the file alone, which a new trainer takes over when its PID is dead on this host.
  :func:`release_workdir` (or the process's exit) removes it.

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

import atexit
import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sharpjax.train.config import RUNTIME_FIELDS, TrainConfig, option, with_method_defaults

try:  # POSIX; without it (or on a file system without locks) the lock is the file alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CHECKPOINT_DIR = "checkpoints"
# Damaged checkpoints are moved here (not deleted), so that their epoch can be saved again.
DAMAGED_DIR = "checkpoints_damaged"
RUN_FILES = ("config.json", "labels.npz", "metrics.jsonl", "result.json")
LOCK_FILE = ".sharpjax.lock"


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be restored, or one cannot be written."""


class WorkdirInUseError(RuntimeError):
    """Another trainer, alive, holds the workdir's lock."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), which tells a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process a lock file names may still run (True when it cannot be told)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True  # another host's process cannot be checked from here
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = _start_time(holder["pid"])
    return started is None or holder.get("start") in (None, started)


# The locks this process holds: {lock path: open file (its flock) or None}.
_HELD: dict[str, Any] = {}


def lock_workdir(workdir: str) -> bool:
    """Takes ``workdir``'s lock for this process; returns False when it held it already.

    Raises:
      WorkdirInUseError: a live trainer holds it; the message has the lock file's path and
        that trainer's PID and host.
    """
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    if path in _HELD:
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for _ in range(5):  # each retry follows a lock that went away or was stale
        holder = _read_lock(path)
        handle = _try_flock(path)
        if handle is False:  # locked by a live process
            raise WorkdirInUseError(_in_use_message(path, holder))
        if handle is not None:
            _write_lock(handle, me)
            _HELD[path] = handle  # a file left without its flock was a trainer that ended
            return True
        # No flock here: the file alone, created exclusively.
        if holder is not None:
            if _alive(holder):
                raise WorkdirInUseError(_in_use_message(path, holder))
            warnings.warn(
                f"Taking over the stale lock {path} of process {holder.get('pid')} on "
                f"{holder.get('host')}, which has ended.",
                RuntimeWarning,
                stacklevel=2,
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue  # another trainer was quicker: look again
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _HELD[path] = None
        return True
    raise WorkdirInUseError(_in_use_message(path, _read_lock(path)))


def _try_flock(path: str) -> Any:
    """An open file of ``path`` holding its exclusive flock; False when a live process holds
    it; None when this file system (or platform) has no flock."""
    if fcntl is None:
        return None
    handle = open(path, "a+")  # noqa: SIM115 - kept open: the lock lives as long as it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP: no locks on this file system
        handle.close()
        return None
    try:
        same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # its holder removed the file between our open and our flock: try again
        handle.close()
        return _try_flock(path)
    return handle


def _write_lock(handle: Any, me: dict[str, Any]) -> None:
    handle.seek(0)
    handle.truncate()
    json.dump(me, handle)
    handle.flush()


def _read_lock(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or not ours: held by someone unknown
    return holder if isinstance(holder, dict) else {}


def _in_use_message(path: str, holder: dict[str, Any] | None) -> str:
    holder = holder or {}
    who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = f" since {holder['since']}" if holder.get("since") else ""
    return (
        f"The workdir {os.path.dirname(path)} is in use by {who}{since} (lock file {path}). "
        "One trainer at a time: wait for it to finish, or use another workdir; if that "
        f"process is not a sharpjax trainer, delete {path}."
    )


def release_workdir(workdir: str) -> None:
    """Removes this process's lock on ``workdir`` (if it holds one)."""
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    if path not in _HELD:
        return
    handle = _HELD.pop(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # while still locked: no other trainer can have taken it
    if handle is not None:
        handle.close()  # drops the flock


@atexit.register
def _release_all() -> None:
    for path in list(_HELD):
        release_workdir(os.path.dirname(path))


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
    """Fields (other than runtime ones) whose saved value differs: ``{name: (saved, new)}``.

    ρ and α left None are the optimizer's defaults on both sides (``config.json`` records
    the values used)."""
    saved = with_method_defaults(saved)
    # The JSON round trip the saved one had.
    new = with_method_defaults(json.loads(json.dumps(config.to_dict())))
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

    Takes the workdir's lock (:func:`lock_workdir`; on process 0 of a multi-process run)
    and keeps it when it returns; the caller releases it (:func:`release_workdir`) when the
    run ends.

    Raises:
      ValueError: the saved config is incompatible with ``config`` (nothing is changed).
      FileExistsError: the workdir holds a finished run and ``overwrite`` is False.
      WorkdirInUseError: another trainer uses the workdir now.
    """
    workdir = os.path.abspath(config.workdir)
    check_writable(workdir, "workdir")
    # The other processes of a multi-process run share process 0's workdir and lock.
    locked = jax.process_index() == 0 and lock_workdir(workdir)
    try:
        return _check_workdir(config, workdir)
    except BaseException:
        if locked:  # nothing changed, nothing newly held
            release_workdir(workdir)
        raise


def _check_workdir(config: TrainConfig, workdir: str) -> bool:
    """The rules of :func:`prepare_workdir`, once the workdir is locked."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        ours = [name for name in (*RUN_FILES, CHECKPOINT_DIR) if name != "config.json"]
        found = [name for name in ours if os.path.exists(os.path.join(workdir, name))]
        if found:
            raise ValueError(
                f"{workdir} has {', '.join(found)} but no config.json: it was not written by "
                "sharpjax.train (or is damaged); nothing was changed. Choose another workdir."
            )
        return False
    with open(config_path) as f:
        saved = json.load(f)
    finished = os.path.exists(os.path.join(workdir, "result.json"))
    if finished and config.overwrite:
        remove_run(workdir)
        return False
    differences = config_differences(saved, config)
    if differences:
        listed = "; ".join(
            f"{k}: saved {a!r}, requested {b!r}" for k, (a, b) in differences.items()
        )
        raise ValueError(
            f"The workdir {workdir} holds a run with an incompatible config ({listed}); nothing "
            "was changed. Resume it with its own config, or use another workdir (or "
            f"{option('overwrite')} once that run is finished)."
        )
    if finished:
        raise FileExistsError(
            f"{workdir} holds a finished run (result.json). Its results are kept: use another "
            f"workdir, or {option('overwrite')} to delete that run and train again."
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
