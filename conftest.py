"""Test-suite settings: XLA compiles fast, and the longest files start first.

The README's command runs the suite with ``pytest-xdist --dist loadfile``: each file goes to
one worker, in collection order (``--no-loadscope-reorder``). A few files are dominated by
one long unit (a notebook, a subprocess with 8 forced devices); started last, one of them
keeps a worker busy while the other idles. Measured on 2 cores (``--durations``), these run longest.
"""

from __future__ import annotations

import os

from tests.multidevice.runner import FAST_COMPILE_FLAGS

# Before anything imports jax; children (notebook kernels, README programs) inherit it.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

LONGEST_FIRST = (
    "tests/test_sharpness_multidevice.py",
    "tests/test_train_sharded.py",
    "tests/test_train_parallel.py",
    "notebooks/sharpness_measures.ipynb",
    "tests/test_parallel.py",
    "tests/test_experiments.py",
    "tests/test_readme.py",
    "notebooks/loss_landscape.ipynb",
    "tests/test_efficient_multidevice.py",
    "tests/test_sharpness_curvature.py",
    "tests/test_sharpness_api.py",
    "notebooks/quickstart.ipynb",
)


def pytest_collection_modifyitems(session, config, items):
    del session, config
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    # sorted() is stable: the other files keep pytest's order, after the long ones.
    items[:] = sorted(items, key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
