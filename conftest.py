"""Test-suite scheduling: the longest files start first.

The README's command runs the suite with ``pytest-xdist --dist loadfile``: each file goes to
one worker, in collection order (``--no-loadscope-reorder``). A few files are dominated by
one long unit (a notebook, a subprocess with 8 forced devices); started last, one of them
keeps a worker busy while the other idles. Measured on 2 cores, these run longest.
"""

from __future__ import annotations

LONGEST_FIRST = (
    "notebooks/sharpness_measures.ipynb",
    "tests/test_sharpness_multidevice.py",
    "tests/test_train_parallel.py",
    "tests/test_parallel.py",
    "tests/test_readme.py",
    "notebooks/loss_landscape.ipynb",
    "tests/test_efficient_multidevice.py",
    "tests/test_train_checkpoint.py",
    "notebooks/quickstart.ipynb",
)


def pytest_collection_modifyitems(session, config, items):
    del session, config
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    # sorted() is stable: the other files keep pytest's order, after the long ones.
    items[:] = sorted(items, key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
