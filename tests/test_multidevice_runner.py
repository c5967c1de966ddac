"""The multi-device runner: a failing script is one traceback, a hang is told from a busy machine.

Tiny child processes (``python -c``) stand in for the 8-device scripts.
"""

from __future__ import annotations

import sys

import pytest

from tests.multidevice import runner

pytest_plugins = ["pytester"]


def test_failure_names_the_process_and_shows_the_end_of_its_output(tmp_path):
    bad = [sys.executable, "-c", "import sys; print('x' * 9000); sys.exit('the cause')"]
    slow = [sys.executable, "-c", "import time; time.sleep(600)"]  # stopped when bad fails
    with pytest.raises(runner.ScriptError, match="exited with status 1") as err:
        runner.run_processes([slow, bad], runner.subprocess_env(), tmp_path)
    message = str(err.value)
    assert message.endswith("the cause\n") and len(message) < runner.STDERR_TAIL + 500


def test_outputs_of_processes_that_succeed(tmp_path):
    say = [sys.executable, "-c", "print('hello')"]
    assert runner.run_processes([say, say], runner.subprocess_env(), tmp_path) == ["hello\n"] * 2


def test_a_process_without_cpu_progress_is_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "STALL_S", 3.0)
    monkeypatch.setattr(runner, "POLL_S", 0.2)
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"]
    with pytest.raises(runner.ScriptError, match=r"no process used any CPU time .*\nstarted"):
        runner.run_processes([sleeper], runner.subprocess_env(), tmp_path)


def test_the_wall_clock_limit_is_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv(runner.TIMEOUT_ENV, raising=False)
    assert runner.wall_clock_limit() is None
    monkeypatch.setattr(runner, "POLL_S", 0.2)
    monkeypatch.setenv(runner.TIMEOUT_ENV, "0.5")
    busy = [sys.executable, "-c", "while True: pass"]  # busy: the stall check stays quiet
    with pytest.raises(runner.ScriptError, match=r"ran past SHARPJAX_TEST_TIMEOUT=0\.5 s"):
        runner.run_processes([busy], runner.subprocess_env(), tmp_path)
    monkeypatch.setenv(runner.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="SHARPJAX_TEST_TIMEOUT='soon' must be a number"):
        runner.wall_clock_limit()


def test_a_failed_script_is_one_traceback_and_one_line_per_later_test(pytester):
    pytester.makepyfile(
        broken="import sys\nsys.exit('broken on purpose: ' + 'y' * 50)\n",
        test_uses_it="""
            from tests.multidevice.runner import multidevice_fixture

            eight = multidevice_fixture("broken", name="eight")

            def test_first(eight):
                assert eight["a"] == 1

            def test_second(eight):
                assert eight["b"] == 2

            def test_third(eight):
                assert eight["c"] == 3
        """,
    )
    monkeypatch = pytest.MonkeyPatch()
    # The child runs from the repo root: let it find the module written in pytester's folder.
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    try:
        # -rN: no short summary, whose width (and so whether it repeats the message) depends on
        # the terminal and on the CI variable.
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rN")
    finally:
        monkeypatch.undo()
    result.assert_outcomes(errors=3)
    text = result.stdout.str()
    assert text.count("broken on purpose") == 1
    assert text.count("broken failed: see test_uses_it.py::test_first") == 2
