"""The README's Python examples run verbatim (the ones marked as complete programs).

A README block that starts with ``import`` is a complete program: it is run as it stands, in
a fresh interpreter (the multi-device one with 8 forced CPU devices), and must exit 0. Blocks
that continue a reader's own code (``params``, ``loss`` undefined) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _programs() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)

    # complete programs: import lines only before the first statement, no jax.distributed
    def code(block: str) -> str:  # without the leading comment lines
        return re.sub(r"^(#.*\n)+", "", block)

    return [b for b in blocks if code(b).startswith(("import flax", "import jax\n")) and
            "jax.distributed" not in b]  # fmt: skip


PROGRAMS = _programs()


def test_readme_has_the_complete_examples():
    text = "\n".join(PROGRAMS)
    for needle in ("minimum_sharpness", "make_shard_map_train_step", "apply_if_finite",
                   "flax_utils import TrainState"):  # fmt: skip
        assert needle in text, needle


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: re.findall(r"sharpjax\.\w+", p)[-1])
def test_readme_program_runs(program, tmp_path):
    env = dict(os.environ)
    if "make_shard_map_train_step" in program:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    path = tmp_path / "example.py"
    path.write_text(program)
    done = subprocess.run(
        [sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
