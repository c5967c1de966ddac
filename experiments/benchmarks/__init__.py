"""The benchmarks: one timing harness (:mod:`benchmarks.harness`) and a small module per
benchmark, each a ``run(config) -> record`` with its ``DEFAULTS``, ``QUICK`` config and
``table(record)`` for the README:

* ``steps``: step time of every optimizer against SGD and SAM;
* ``cond``: a convolution's gradient under ``lax.cond`` / ``lax.scan`` on XLA:CPU;
* ``roundtrip``: the host round trip of the planned and split steps;
* ``memory``: XLA's temporary memory of one train step, per model;
* ``measures``: cost of the sharpness measures;
* ``parallel``: the data-parallel steps against the plain jitted SAM step;
* ``trainer``: the trainer against a hand-written loop (and its GPU and precision sections);
* ``matfree``: our Lanczos, SLQ and trace estimators against matfree 0.6.

``python -m experiments.benchmarks`` (or ``python experiments/benchmarks/run.py``) runs them;
the experiments beside this folder test the papers' claims.
"""
