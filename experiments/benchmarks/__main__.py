"""``python -m experiments.benchmarks``: see :mod:`benchmarks.run`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run import main

main()
