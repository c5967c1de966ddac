"""Training under faults: damaged checkpoints, unwritable directories, interrupted runs, and
a model that does not fit the data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax.data import Dataset, load_dataset
from sharpjax.train import TrainConfig, train
from sharpjax.train.checkpoint import Checkpointer, CheckpointError

# --------------------------------------------------------------------------------------
# The Checkpointer on its own: damaged checkpoints.
# --------------------------------------------------------------------------------------


def _state(epoch: int) -> dict:
    return {"w": jnp.arange(300.0) * epoch, "step": jnp.asarray(epoch, jnp.int32)}


def _template() -> dict:
    return {"w": jnp.zeros(300), "step": jnp.zeros([], jnp.int32)}


def _two_checkpoints(workdir: Path) -> Path:
    ckpt = Checkpointer(str(workdir), max_to_keep=3)
    for epoch in (1, 2):
        ckpt.save(epoch, _state(epoch), {"epoch": epoch, "history": [epoch]})
    ckpt.close()
    return workdir / "checkpoints"


def _truncate_arrays(step: Path) -> None:
    files = [p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, "the layout of orbax's array files changed: update this test"
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)


def _remove_meta_file(step: Path) -> None:
    os.remove(step / "meta" / "metadata")


def _bad_meta_json(step: Path) -> None:
    (step / "meta" / "metadata").write_text('{"epoch": 2, "hist')


def _meta_not_a_record(step: Path) -> None:
    (step / "meta" / "metadata").write_text("[]")


def _remove_state(step: Path) -> None:
    shutil.rmtree(step / "state")


DAMAGES = [_truncate_arrays, _remove_meta_file, _bad_meta_json, _meta_not_a_record, _remove_state]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, damage):
    directory = _two_checkpoints(tmp_path)
    damage(directory / "2")
    ckpt = Checkpointer(str(tmp_path))
    with pytest.warns(RuntimeWarning, match=r"checkpoints/2 is damaged.*Resuming from epoch 1"):
        epoch, state, meta = ckpt.restore_latest(_template())
    assert epoch == 1 and meta == {"epoch": 1, "history": [1]}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(300.0))
    # Set aside (not deleted), so that epoch 2 can be saved again by the resumed run.
    assert (tmp_path / "checkpoints_damaged" / "2").is_dir()
    ckpt.save(2, _state(2), {"epoch": 2, "history": [1, 2]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epoch, state, _ = ckpt.restore_latest(_template())
    assert epoch == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), 2 * np.arange(300.0))
    ckpt.close()


def test_missing_array_metadata_is_not_damage(tmp_path):
    # state/_METADATA only describes the tree; the template gives it, and the data is intact.
    directory = _two_checkpoints(tmp_path)
    os.remove(directory / "2" / "state" / "_METADATA")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epoch, state, _ = Checkpointer(str(tmp_path)).restore_latest(_template())
    assert epoch == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), 2 * np.arange(300.0))


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    directory = _two_checkpoints(tmp_path)
    _bad_meta_json(directory / "2")
    _remove_state(directory / "1")
    with pytest.raises(CheckpointError, match=r"No checkpoint.*epoch 2: JSONDecodeError.*epoch 1"):
        Checkpointer(str(tmp_path)).restore_latest(_template())
    # Nothing moved: every later attempt fails the same clear way.
    assert sorted(os.listdir(directory)) == ["1", "2"]


def test_no_checkpoint_at_all_is_none(tmp_path):
    assert Checkpointer(str(tmp_path)).restore_latest(_template()) is None


# --------------------------------------------------------------------------------------
# Directories that cannot be written.
# --------------------------------------------------------------------------------------


def _under_a_file(tmp_path: Path) -> Path:
    # Tests may run as root, for whom chmod does not stop writes; a path under a regular
    # file cannot be created by anyone.
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    return blocker / "run"


def test_unwritable_checkpoint_directory_is_refused_on_construction(tmp_path):
    with pytest.raises(PermissionError, match=r"checkpoint directory .*blocker/run/checkpoints"):
        Checkpointer(str(_under_a_file(tmp_path)))


SAVE_FAILS = """
    import os, shutil, sys, threading
    import jax.numpy as jnp
    from sharpjax.train.checkpoint import CheckpointError, Checkpointer

    ckpt = Checkpointer(sys.argv[1])
    # The directory disappears under the run (a lost mount): every write now fails.
    shutil.rmtree(ckpt.directory)
    open(ckpt.directory, "w").close()
    try:
        ckpt.save(1, {"w": jnp.ones(3)}, {"epoch": 1, "history": []})
    except CheckpointError as e:
        print("CAUGHT", e)
    # A thread that is not a daemon holds the process at exit until it ends. orbax's event-loop
    # thread may still be winding down right after the error (milliseconds of work), so give
    # each such thread 120 s (a busy machine still grants it seconds of CPU in that time); the
    # bug held the process ~300 s.
    main = threading.main_thread()
    for t in threading.enumerate():
        if t is not main and not t.daemon:
            t.join(timeout=120)
    print("HOLDING", [t.name for t in threading.enumerate() if t is not main and not t.daemon])
"""


def test_failed_save_raises_with_path_and_ends_the_process(tmp_path):
    # orbax's asynchronous save used to leave a thread that held the process ~300 s at exit:
    # no thread may be left to hold it (no time limit here: the machine may be busy).
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SAVE_FAILS), str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HOLDING []" in out.stdout, out.stdout
    assert "CAUGHT Saving the checkpoint of epoch 1 to " in out.stdout
    assert f"{tmp_path}/run/checkpoints/1 failed: NotADirectoryError" in out.stdout


# --------------------------------------------------------------------------------------
# Through train(): a tiny MLP on a slice of digits.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_digits():
    ds = load_dataset("digits")
    return Dataset(
        ds.name, ds.x_train[:128], ds.y_train[:128], ds.y_train_clean[:128],
        ds.x_test[:64], ds.y_test[:64], ds.num_classes, ds.noise, ds.noise_rate, ds.seed,
    )  # fmt: skip


def _config(workdir, **changes) -> TrainConfig:
    values = dict(
        dataset="digits",
        model="mlp",
        model_kwargs={"hidden_sizes": [16]},
        optimizer="sam",
        epochs=3,
        batch_size=32,
        max_steps_per_epoch=2,
        progress=False,
        workdir=None if workdir is None else str(workdir),
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def straight(small_digits):
    return train(_config(None), small_digits)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _assert_same_run(a, b):
    # The same compiled step on the same inputs; a wrong resume point (a lost or repeated
    # epoch) would differ by whole steps, O(lr · grad) ≈ 1e-2, far above these tolerances.
    np.testing.assert_allclose(_flat(a.params), _flat(b.params), rtol=1e-5, atol=1e-6)
    for ra, rb in zip(a.history, b.history, strict=True):
        for key in ("train_accuracy", "test_loss", "test_accuracy"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), key


def test_stop_without_checkpoint_every_is_resumable(small_digits, straight, tmp_path):
    stopped = train(_config(tmp_path, stop_after_epochs=1), small_digits)
    assert not stopped.completed and (tmp_path / "checkpoints" / "1").is_dir()
    resumed = train(_config(tmp_path), small_digits)
    assert resumed.completed and len(resumed.history) == 3
    _assert_same_run(resumed, straight)
    # checkpoint_every=0 still means no periodic checkpoint: only the stop's.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_resume_skips_a_damaged_latest_checkpoint(small_digits, straight, tmp_path):
    train(_config(tmp_path, checkpoint_every=1, stop_after_epochs=2), small_digits)
    _bad_meta_json(tmp_path / "checkpoints" / "2")
    with pytest.warns(RuntimeWarning, match="checkpoints/2 is damaged"):
        resumed = train(_config(tmp_path, checkpoint_every=1), small_digits)
    assert resumed.completed
    _assert_same_run(resumed, straight)


def test_unwritable_workdir_fails_before_any_data(tmp_path, monkeypatch):
    import sharpjax.train.loop as loop

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the workdir was checked")

    monkeypatch.setattr(loop, "load_dataset", no_loading)
    with pytest.raises(PermissionError, match=r"workdir .*blocker/run cannot be written"):
        train(_config(_under_a_file(tmp_path)))


# --------------------------------------------------------------------------------------
# A model that does not fit the data fails before anything is compiled.
# --------------------------------------------------------------------------------------


def _sequences(n: int = 64) -> Dataset:
    x = np.zeros((n, 40, 1), np.float32)  # mnist1d's shape, without generating it
    y = np.arange(n, dtype=np.int32) % 10
    return Dataset("mnist1d", x, y, y, x[:16], y[:16], 10, "none", 0.0, 0)


class WrongHead(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))  # 3 logits for 10 classes


@pytest.mark.parametrize(
    "changes, dataset, match",
    [
        (
            {"model": "resnet18", "model_kwargs": {}, "dataset": "mnist1d"},
            "seq",
            r"resnet18.*images.*\(40, 1\)",
        ),
        ({"model": "cnn1d", "model_kwargs": {}}, "img", r"cnn1d.*sequences.*\(8, 8, 1\).*lenet"),
        ({"model": "mlp"}, "wrong_head", r"logits of shape \(3,\), not \(10,\)"),
    ],
)
def test_model_that_does_not_fit_the_data_is_refused(
    small_digits, changes, dataset, match, monkeypatch
):
    import sharpjax.train.loop as loop

    def no_compile(*args, **kwargs):
        raise AssertionError("the step was built before the model was checked")

    monkeypatch.setattr(loop, "compiled_functions", no_compile)
    data = _sequences() if dataset == "seq" else small_digits
    model = WrongHead() if dataset == "wrong_head" else None
    with pytest.raises(ValueError, match=match):
        train(_config(None, **changes), data, model=model)
