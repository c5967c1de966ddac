"""Every Python block of the README runs as written, in a fresh interpreter, and exits 0.

* A block in a ``<details><summary>The lines this fragment assumes</summary>`` fold is a
  fragment's declared preamble: it is not run alone but put in front of the next Python block.
* A block whose first line is a comment of the form ``# NAME=value ... python this.py`` runs
  with those environment variables (``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
* A block that calls ``jax.distributed.initialize`` reads its cluster from ``COORDINATOR``,
  ``NUM_PROCESSES`` and ``PROCESS_ID``: it runs as a one-process cluster on localhost.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREAMBLE = "<details><summary>The lines this fragment assumes</summary>"
ENV_LINE = re.compile(r"# ((?:[A-Z_]+=\S+ )+)python ")


def _programs() -> dict[str, str]:
    """The README's programs by the heading of their section (numbered when it has several)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    programs: dict[str, str] = {}
    preamble = ""
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        before = text[: match.start()].rstrip()
        if before.endswith(PREAMBLE):
            preamble += match.group(1)
            continue
        prose = re.sub(r"```.*?```", "", before, flags=re.S)  # a code comment is no heading
        heading = re.findall(r"^#+ (.*)$", prose, flags=re.M)[-1]
        base = name = re.sub(r"\W+", "_", heading).strip("_")
        while name in programs:
            name = f"{base}_{len([k for k in programs if k.startswith(base)]) + 1}"
        programs[name] = preamble + match.group(1)
        preamble = ""
    assert not preamble, "a fragment's preamble is not followed by a Python block"
    return programs


PROGRAMS = _programs()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_has_the_examples():
    text = "\n".join(PROGRAMS.values())
    for needle in (
        "minimum_sharpness",
        "make_shard_map_train_step",
        "apply_if_finite",
        "flax_utils import TrainState",
        "jax.distributed.initialize",
        "nnx.Optimizer",
        "planned_step",
        "plan_second_gradient",
        '"batch_stats"',
        '"dropout"',
    ):
        assert needle in text, needle


@pytest.mark.parametrize("name", PROGRAMS)
def test_readme_program_runs(name, tmp_path):
    program = PROGRAMS[name]
    env = dict(os.environ)
    for line in program.splitlines():
        if found := ENV_LINE.match(line):
            for name, value in (item.split("=", 1) for item in found.group(1).split()):
                # XLA_FLAGS adds to the suite's own (conftest.py), the others replace.
                joined = name == "XLA_FLAGS" and name in env
                env[name] = f"{env[name]} {value}" if joined else value
    if "jax.distributed.initialize(" in program:
        env.update(COORDINATOR=f"127.0.0.1:{_free_port()}", NUM_PROCESSES="1", PROCESS_ID="0")
    path = tmp_path / "example.py"
    path.write_text(program)
    done = subprocess.run(
        [sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
