"""``pip install sharpjax`` (no extras) is enough for the optimizers and the measures.

pyproject.toml's core dependencies are jax, optax, chex and numpy; everything of the
``train`` extra (flax, orbax, tensorflow-datasets, scikit-learn, mnist1d, matplotlib, tqdm,
scipy, ...) must not be imported by ``import sharpjax`` or ``import sharpjax.sharpness``, nor by
a SAM step and a Hessian trace. A fresh interpreter runs them with every import of the extra
refused by a ``sys.meta_path`` finder, as if the packages were not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# distribution name in pyproject.toml -> the top-level module it installs
IMPORT_NAMES = {
    "flax": "flax",
    "orbax-checkpoint": "orbax",
    "tensorflow-datasets": "tensorflow_datasets",
    "importlib_resources": "importlib_resources",
    "scikit-learn": "sklearn",
    "mnist1d": "mnist1d",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "scipy": "scipy",
}

PROGRAM = """
import sys

BLOCKED = {blocked!r}


class NotInstalled:  # refuses the train extra's modules, as if they were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed (blocked by the light-install test)")
        return None


sys.meta_path.insert(0, NotInstalled())

import jax
import jax.numpy as jnp
import optax

import sharpjax
import sharpjax.sharpness

params = {{"w": jnp.array([1.0, -2.0, 0.5])}}
loss = lambda p: jnp.sum(jnp.arange(1.0, 4.0) * p["w"] ** 2)
tx = optax.chain(sharpjax.sam(0.05), optax.sgd(0.1))
state = tx.init(params)
updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
trace = sharpjax.sharpness.hessian_trace(loss, params, jax.random.key(0), num_samples=4)
print(float(trace.value), sharpjax.diagnostics(state)["grad_norm"])
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & BLOCKED)
assert not loaded, loaded

# the training stack says what to install instead of a bare "No module named 'flax'"
import importlib

for name in ("sharpjax.train", "sharpjax.models", "sharpjax.flax_utils"):
    try:
        importlib.import_module(name)
    except ImportError as err:
        assert name in str(err) and 'pip install "sharpjax[train]"' in str(err), err
    else:
        raise AssertionError(f"{{name}} imported without the train extra")
"""


def _requirement_name(requirement: str) -> str:
    for stop in "<>=[; ":
        requirement = requirement.split(stop)[0]
    return requirement.strip()


def test_core_dependencies_are_the_light_ones():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    assert core == {"jax", "jaxlib", "optax", "chex", "numpy"}
    train = {_requirement_name(r) for r in project["optional-dependencies"]["train"]}
    # every package of the extra is blocked below (a new one must be added there)
    assert train == set(IMPORT_NAMES)
    assert "sharpjax[train]" in project["optional-dependencies"]["test"]


def test_import_and_a_step_without_the_train_extra():
    program = PROGRAM.format(blocked=set(IMPORT_NAMES.values()))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Hessian of Σ_i i·w_i² is diag(2, 4, 6): Hutchinson's Rademacher estimate is exact here
    assert float(done.stdout.split()[0]) == 12.0
