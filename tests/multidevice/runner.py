"""One home for the multi-device test scaffolding: the scripts' device header and the runner.

A script under ``tests/multidevice/`` forces its own CPU devices before it imports jax::

    import os

    from tests.multidevice.runner import cpu_device_flags

    os.environ["XLA_FLAGS"] = cpu_device_flags(8)

    import jax

and a test module runs it once, in a subprocess, through a fixture::

    eight = multidevice_fixture("tests.multidevice.checks_8dev", name="eight")

No fixed wall-clock limit: a test must pass on a 2-core machine at any load, and a script that
takes 40 s idle takes many minutes at load 30. A hang is told from slowness by CPU time: the
processes are stopped only when together they have used no CPU time for ``STALL_S`` seconds
(a busy machine still gives every runnable process a share; a deadlock uses none; where
``/proc`` cannot be read there is no such check). The
environment variable ``SHARPJAX_TEST_TIMEOUT`` (seconds) adds a wall-clock limit for those
who want one. This module imports neither jax nor numpy: the scripts import it first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_ENV = "SHARPJAX_TEST_TIMEOUT"
# No CPU time at all for this long means a hang, not a busy machine (at load 40 on 2 cores a
# process still gets ~1/20 of a core, i.e. ~30 CPU seconds in this window).
STALL_S = 600.0
POLL_S = 2.0
STDERR_TAIL = 4000
# XLA:CPU spends most of a test's time compiling (a Lanczos measure on a 1.5k-parameter MLP:
# 11 CPU s to compile, 0.1 s to run); together these bring that to 2.4 s (LLVM's optimisation
# off, and the older elemental emitter instead of the fusion emitters, which is slower alone
# but fastest with the former). The suite sets them for its own process too (conftest.py):
# tests compare against equations and float64 references with tolerances derived from the
# arithmetic, which code generation does not enter.
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)


def cpu_device_flags(count: int, *, fast_compile: bool = True) -> str:
    """XLA_FLAGS that give a process ``count`` CPU devices; set them before jax is imported.

    ``fast_compile`` also turns XLA's optimizations down: the checks are tiny, compiling
    dominates them, and they compare numbers between programs compiled alike.
    """
    flags = f"--xla_force_host_platform_device_count={count}"
    return f"{flags} {FAST_COMPILE_FLAGS}" if fast_compile else flags


def subprocess_env(cpu_devices: int | None = None, *, fast_compile: bool = False) -> dict:
    """This environment for a child run from the repo root on CPU: the repo on PYTHONPATH and
    XLA_FLAGS dropped (the scripts set their own), or set to ``cpu_devices`` CPU devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if cpu_devices is not None:
        env["XLA_FLAGS"] = cpu_device_flags(cpu_devices, fast_compile=fast_compile)
    return env


def free_port() -> int:
    """A TCP port free on localhost now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wall_clock_limit() -> float | None:
    """``SHARPJAX_TEST_TIMEOUT`` in seconds, or None (no wall-clock limit) when unset."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        limit = float(value)
    except ValueError:
        limit = -1.0
    if not limit > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds > 0 (or unset)")
    return limit


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process (Linux /proc), or None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ScriptError(AssertionError):
    """A multi-device subprocess failed, hung or ran past SHARPJAX_TEST_TIMEOUT."""


def run_processes(commands: list[list[str]], env: dict, log_dir: Path) -> list[str]:
    """Runs the commands side by side from the repo root; returns their combined outputs.

    Raises ScriptError naming the process and the end of its output when one exits non-zero
    (the others are stopped then: they would wait for it), when all of them together use no
    CPU time for ``STALL_S`` seconds, or past ``SHARPJAX_TEST_TIMEOUT``.
    """
    limit, start = wall_clock_limit(), time.monotonic()
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"process{i}.log" for i in range(len(commands))]
    procs = []
    try:
        for cmd, log in zip(commands, logs, strict=True):
            with open(log, "w") as f:  # a file, not a pipe: a chatty child cannot block on it
                procs.append(
                    subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
                )
        seen: dict[int, float] = {}
        last_progress = time.monotonic()
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i = failed[0]
                raise ScriptError(
                    f"{_describe(commands[i])} exited with status {codes[i]}; the end of its "
                    f"output ({logs[i]}):\n{_tail(logs[i])}"
                )
            if all(c == 0 for c in codes):
                return [log.read_text(errors="replace") for log in logs]
            now = time.monotonic()
            for p in procs:
                if p.poll() is not None:
                    continue
                cpu = _cpu_seconds(p.pid)
                if cpu is None or cpu > seen.get(p.pid, -1.0):  # None: cannot tell, no hang
                    seen[p.pid], last_progress = cpu if cpu is not None else -1.0, now
            if now - last_progress > STALL_S:
                raise ScriptError(
                    f"{_describe(commands[0])}: no process used any CPU time for {STALL_S:.0f} s "
                    f"(a hang, not a busy machine); the end of its output:\n{_tail(logs[0])}"
                )
            if limit is not None and now - start > limit:
                raise ScriptError(
                    f"{_describe(commands[0])} ran past {TIMEOUT_ENV}={limit:g} s (unset it "
                    f"for no wall-clock limit); the end of its output:\n{_tail(logs[0])}"
                )
            time.sleep(POLL_S)
    finally:
        for p in procs:  # a failure or a hang ends every process instead of leaving it
            if p.poll() is None:
                p.kill()
                p.wait()


def _describe(cmd: list[str]) -> str:
    return " ".join(["python", *cmd[1:]] if cmd and cmd[0] == sys.executable else cmd)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-STDERR_TAIL:]


def run_multidevice_script(module: str, out: Path) -> dict:
    """Runs ``python -m module out`` (a script that forces its own CPU devices) from the repo
    root; returns the JSON it wrote to ``out``, or raises ScriptError with the end of its
    output."""
    out = Path(out)
    run_processes([[sys.executable, "-m", module, str(out)]], subprocess_env(), out.parent)
    return json.loads(out.read_text())


def multidevice_fixture(module: str, *, name: str) -> Callable:
    """A fixture ``name`` giving each test the JSON results of ``python -m module OUT``.

    The script runs once per test module (the first test that asks); its results are cached.
    When it fails, that first test fails with the cause and the end of the script's output,
    every later test with one line pointing to the first: one slow or broken script is one
    traceback, not one per test.
    """
    run: dict = {}

    @pytest.fixture(name=name)
    def fixture(request, tmp_path_factory) -> dict:
        if not run:
            out = tmp_path_factory.mktemp(module.rsplit(".", 1)[-1]) / "results.json"
            try:
                run["results"] = run_multidevice_script(module, out)
            except ScriptError as err:
                run["first"], run["error"] = request.node.nodeid, str(err)
            if "error" in run:  # outside the except: no chained traceback
                pytest.fail(run["error"], pytrace=False)
        if "error" in run:
            pytest.fail(f"{module} failed: see {run['first']}", pytrace=False)
        return run["results"]

    return fixture
