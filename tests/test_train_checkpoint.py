"""Checkpoints: bit-identical resume, incompatible workdirs, finished runs kept."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from sharpjax.data import Dataset, load_dataset
from sharpjax.train import TrainConfig, config_from_args, train
from sharpjax.train.checkpoint import (
    LOCK_FILE,
    WorkdirInUseError,
    prepare_workdir,
    release_workdir,
)
from sharpjax.train.config import resolved_config
from sharpjax.train.metrics import TIMING_KEYS, read_jsonl


class BNNet(nn.Module):
    """A small BatchNorm model, so that batch_stats go through the checkpoint too."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def noisy_digits():
    ds = load_dataset("digits", noise="symmetric", noise_rate=0.2, seed=0)
    # a fifth of the data keeps the test fast
    return Dataset(
        ds.name, ds.x_train[:320], ds.y_train[:320], ds.y_train_clean[:320],
        ds.x_test[:100], ds.y_test[:100], ds.num_classes, ds.noise, ds.noise_rate, ds.seed,
    )  # fmt: skip


def config(workdir, **changes) -> TrainConfig:
    values = dict(
        dataset="digits",
        model="mlp",
        noise="symmetric",
        noise_rate=0.2,
        # stateful optimizer (VaSSO's d, SANER's schedule, momentum) and every random draw
        optimizer="saner_vasso",
        saner_warmup_epochs=2,
        lr_schedule="cosine",
        grad_noise_std=1e-3,
        param_noise_std=1e-4,
        epochs=3,
        batch_size=32,
        max_steps_per_epoch=4,
        checkpoint_every=1,
        eval_every=2,
        progress=False,
        workdir=str(workdir),
    )
    values.update(changes)
    return TrainConfig(**values)


def without_timings(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def assert_trees_equal(a, b):
    # Bitwise on purpose: both runs are in this process and call the same cached, jitted step
    # (train() reuses it across runs with the same program) on the same restored inputs, so a
    # resume replays the very same compiled program. Across processes this would not hold.
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_is_bit_identical(noisy_digits, tmp_path):
    straight = train(config(tmp_path / "a"), noisy_digits, model=BNNet())

    stopped = train(config(tmp_path / "b", stop_after_epochs=1), noisy_digits, model=BNNet())
    assert not stopped.completed and len(stopped.history) == 1
    assert stopped.history[0]["test_accuracy"] is None  # eval_every=2, as in the whole run
    assert not (tmp_path / "b" / "result.json").exists()
    resumed = train(config(tmp_path / "b"), noisy_digits, model=BNNet())
    assert resumed.completed

    assert_trees_equal(resumed.params, straight.params)
    assert_trees_equal(resumed.batch_stats, straight.batch_stats)
    assert_trees_equal(resumed.opt_state, straight.opt_state)
    assert without_timings(resumed.history) == without_timings(straight.history)
    assert without_timings(read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))) == without_timings(
        straight.history
    )
    result_a = json.loads((tmp_path / "a" / "result.json").read_text())
    result_b = json.loads((tmp_path / "b" / "result.json").read_text())
    assert without_timings([result_a["final"]]) == without_timings([result_b["final"]])
    assert straight.final["memorization"] is not None


def test_incompatible_and_finished_workdirs(noisy_digits, tmp_path):
    workdir = tmp_path / "run"
    small = dict(epochs=1, max_steps_per_epoch=1, optimizer="sam", grad_noise_std=0.0)
    train(config(workdir, **small), noisy_digits)
    files = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    assert {"config.json", "metrics.jsonl", "result.json", "labels.npz"} <= set(files)

    with pytest.raises(ValueError, match=r"incompatible config \(.*seed: saved 0, requested 1"):
        train(config(workdir, **small, seed=1), noisy_digits)
    with pytest.raises(ValueError, match="optimizer: saved 'sam', requested 'gsam'"):
        train(config(workdir, **{**small, "optimizer": "gsam"}), noisy_digits)
    with pytest.raises(FileExistsError, match="finished run"):
        train(config(workdir, **small), noisy_digits)
    # a runtime field (progress, checkpoint_every, ...) does not make it a different run
    with pytest.raises(FileExistsError, match="finished run"):
        train(config(workdir, **small, checkpoint_every=0, eval_every=5), noisy_digits)
    assert files == {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}

    again = train(config(workdir, **small, overwrite=True), noisy_digits)
    assert again.completed and (workdir / "result.json").exists()
    assert len(read_jsonl(str(workdir / "metrics.jsonl"))) == 1


def test_foreign_run_files_are_refused(noisy_digits, tmp_path):
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"has checkpoints but no config\.json"):
        train(config(tmp_path / "a"), noisy_digits)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "result.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has result\.json but no config\.json"):
        train(config(tmp_path / "b"), noisy_digits)
    assert (tmp_path / "b" / "result.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["result.json"]


# --------------------------------------------------------------------------------------
# The workdir lock, the finished-run message, the recorded defaults (no training).
# --------------------------------------------------------------------------------------

HOLDER = """
import sys
from sharpjax.train.checkpoint import lock_workdir
lock_workdir(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()  # holds the lock until the test closes stdin or kills it
"""


def _holder(workdir) -> subprocess.Popen:
    from tests.multidevice.runner import subprocess_env

    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    line = proc.stdout.readline()  # no time limit: it comes once the imports are done
    assert line == "locked\n", proc.stderr.read()[-3000:]
    return proc


def test_a_second_trainer_is_refused_with_the_path_and_pid_of_the_first(tmp_path, capsys):
    from sharpjax.train.__main__ import main

    workdir = tmp_path / "run"
    first = _holder(workdir)
    lock = workdir / LOCK_FILE
    try:
        with pytest.raises(WorkdirInUseError, match=f"in use by process {first.pid} on ") as err:
            prepare_workdir(config(workdir))
        assert str(lock) in str(err.value) and "wait for it to finish" in str(err.value)
        assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE]  # nothing touched
        # The command line: one line, exit status 2.
        argv = ["--dataset=digits", "--model=mlp", f"--workdir={workdir}", "--progress=false"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"in use by process {first.pid}" in err and err.count("\n") == 1
    finally:
        first.kill()  # SIGKILL: no clean-up, the lock file stays behind
        first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid
    # The kernel dropped the dead trainer's flock: the next one takes the workdir.
    try:
        assert prepare_workdir(config(workdir)) is False  # a fresh run
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        release_workdir(str(workdir))
    assert not lock.exists()


def test_without_flock_a_stale_lock_file_is_taken_over(tmp_path, monkeypatch):
    import socket

    import sharpjax.train.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "fcntl", None)  # a file system without locks
    workdir, host = tmp_path / "run", socket.gethostname()
    workdir.mkdir()
    lock = workdir / LOCK_FILE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID is free now
    lock.write_text(json.dumps({"pid": dead.pid, "host": host}))
    with pytest.warns(RuntimeWarning, match=re.escape(f"stale lock {lock} of process {dead.pid}")):
        assert checkpoint.lock_workdir(str(workdir)) is True
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert checkpoint.lock_workdir(str(workdir)) is False  # held already: no-op
    checkpoint.release_workdir(str(workdir))
    assert not lock.exists()
    # A live process on this host, or any process on another host, holds it.
    for holder in ({"pid": os.getppid(), "host": host}, {"pid": dead.pid, "host": "elsewhere"}):
        lock.write_text(json.dumps(holder))
        with pytest.raises(WorkdirInUseError, match=f"process {holder['pid']} on {holder['host']}"):
            checkpoint.lock_workdir(str(workdir))
        assert json.loads(lock.read_text()) == holder  # left as it was


def _fake_finished_run(workdir, cfg) -> None:
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(resolved_config(cfg).to_dict()))
    (workdir / "result.json").write_text("{}")


def test_finished_run_message_names_the_option_as_the_caller_spells_it(tmp_path, capsys):
    from sharpjax.train.__main__ import main

    workdir = tmp_path / "run"
    argv = ["--dataset=digits", "--model=mlp", "--optimizer=sam", f"--workdir={workdir}"]
    _fake_finished_run(workdir, config_from_args(argv))
    with pytest.raises(FileExistsError, match=r"or overwrite=True to delete that run"):
        prepare_workdir(config_from_args(argv))
    assert main([*argv, "--progress=false"]) == 2
    err = capsys.readouterr().err
    assert "or --overwrite to delete that run" in err and "overwrite=True" not in err
    assert err.count("\n") == 1


def test_config_json_records_the_defaults_and_resumes_with_them(tmp_path):
    cfg = config(tmp_path / "run", optimizer="saner")  # rho and alpha None: the defaults
    saved = resolved_config(cfg, num_devices=1)
    assert (saved.rho, saved.alpha, saved.num_devices) == (0.1, 0.5, 1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved.to_dict()))
    try:
        assert prepare_workdir(cfg) is True  # None and the default it stands for agree
        assert prepare_workdir(cfg.replace(rho=0.1)) is True
        with pytest.raises(ValueError, match=r"rho: saved 0\.1, requested 0\.2"):
            prepare_workdir(cfg.replace(rho=0.2))
    finally:
        release_workdir(cfg.workdir)
