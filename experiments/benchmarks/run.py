"""Runs the benchmarks, or rewrites the README's tables from their stored JSON.

    python -m experiments.benchmarks                          # all, into runs/benchmarks/
    python -m experiments.benchmarks --only steps cond --repeats 10
    python -m experiments.benchmarks --only steps --set models='["cnn8","lenet28"]' \\
        optimizers='["esam","momentum_sam"]' --tag esam --out results/benchmarks
    python -m experiments.benchmarks --quick                  # smoke run: tiny models, seconds
    python -m experiments.benchmarks --tables                 # print the tables of the JSON
    python -m experiments.benchmarks --tables --write-readme  # and rewrite them in README.md
    python experiments/benchmarks/run.py ...                  # the same

Each benchmark writes ``<out>/<name>[_<tag>].json`` in the harness's format
(:mod:`benchmarks.harness`). ``--repeats`` sets the interleaved rounds of the timed
benchmarks; ``--set KEY=VALUE`` (JSON values; a bare word is a string) overrides a
benchmark's config (``DEFAULTS`` in its module), applied to every benchmark of ``--only``
that has that key. The README's tables sit between ``<!-- table:NAME -->`` and
``<!-- /table -->``, where NAME is the stem of a JSON file in ``--results``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)

from benchmarks import harness  # noqa: E402

# name -> module of experiments/benchmarks/; the order in which "all" runs them
BENCHMARKS = {
    "steps": "benchmarks.steps",
    "cond": "benchmarks.cond",
    "roundtrip": "benchmarks.roundtrip",
    "memory": "benchmarks.memory",
    "measures": "benchmarks.measures",
    "parallel": "benchmarks.parallel",
    "trainer": "benchmarks.trainer",
    "matfree": "benchmarks.matfree",
    "mesh_memory": "benchmarks.mesh_memory",
}
# Not in "all": matfree needs a package that is not a dependency; trainer trains for minutes;
# mesh_memory needs 8 devices, forced only when it is imported before jax (run it alone).
OPTIONAL = {"matfree", "trainer", "mesh_memory"}


def module(name: str):
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])


def parse_set(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def config_of(name: str, args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The benchmark's ``DEFAULTS``, then ``QUICK`` (``--quick``), ``--repeats``, ``--set``
    (a key that none of the benchmarks ``names`` being run has is an error)."""
    mod = module(name)
    config = dict(mod.DEFAULTS)
    if args.quick:
        config.update(mod.QUICK)
    if args.repeats is not None and "rounds" in config:
        config["rounds"] = args.repeats
    overrides = parse_set(args.set)
    unknown = set(overrides) - set().union(*(module(n).DEFAULTS for n in names))
    if unknown:
        raise SystemExit(
            f"--set: {sorted(unknown)} is not a config key of {', '.join(names)}; "
            f"{name} has {sorted(config)}"
        )
    config.update({k: v for k, v in overrides.items() if k in config})
    return config


def tables(folder: str) -> dict[str, str]:
    """NAME -> the markdown of ``<folder>/NAME.json``: its module's table and the caption."""
    out = {}
    for name, record in harness.read_all(folder).items():
        mod = module(record["benchmark"])
        body = mod.table(record)
        path = os.path.join(folder, f"{name}.json")
        out[name] = body + "\n" + harness.caption(record, path) + "\n"
    return out


def write_readme(folder: str, readme: str) -> list[str]:
    """Rewrites the marked tables of ``readme`` from ``folder``; returns the names replaced."""
    with open(readme) as f:
        text = f.read()
    new, done = harness.replace_tables(text, tables(folder))
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return done


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help=f"benchmarks to run (default: all but {', '.join(sorted(OPTIONAL))}); "
        f"from {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, 2 rounds")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config")
    parser.add_argument("--tag", default=None, help="file name suffix: <name>_<tag>.json")
    parser.add_argument(
        "--out",
        default=os.path.join(harness.REPO_ROOT, "runs", "benchmarks"),
        help="where the JSON goes (default runs/benchmarks; the README's: results/benchmarks)",
    )
    parser.add_argument(
        "--tables", action="store_true", help="do not run: print the tables of --results"
    )
    parser.add_argument(
        "--write-readme", action="store_true", help="with --tables: rewrite them in README.md"
    )
    parser.add_argument("--results", default=harness.RESULTS, help="JSON folder of --tables")
    args = parser.parse_args(argv)

    if args.tables:
        made = tables(args.results)
        for name, text in made.items():
            print(f"<!-- table:{name} -->\n{text}<!-- /table -->\n")
        done = []
        if args.write_readme:
            done = write_readme(args.results, os.path.join(harness.REPO_ROOT, "README.md"))
            print(f"README.md: rewrote {', '.join(done) or 'no'} tables")
        return {"tables": made, "written": done}

    names = args.only or [n for n in BENCHMARKS if n not in OPTIONAL]
    for name in names:
        module(name)  # unknown names fail before anything runs
    records = {}
    for name in names:
        config = config_of(name, args, names)
        if args.tag:
            config["tag"] = args.tag
        print(f"[{name}] {json.dumps(config)}", flush=True)
        record = module(name).run(config)
        path = harness.write(record, args.out)
        print(f"[{name}] wrote {os.path.relpath(path)}; {harness.load_note(record)}", flush=True)
        records[name] = record
    return {"records": records}


if __name__ == "__main__":
    main()
