"""Per-device memory of one train step by mesh shape, ahead of time (nothing allocated).

The table a user reads before renting accelerators: the SGD, SAM and VaSSO steps of a ViT-B/16
(86 M parameters, 224×224 images) and of a decoder of about 1 B parameters (32 k vocabulary,
256 tokens) compiled from abstract shapes (``jax.ShapeDtypeStruct``) on meshes of 8 devices
(data × fsdp × model = 8×1×1, 1×8×1, 2×4×1, 2×2×2), with XLA's own accounting
(``jax.jit(step).lower(...).compile().memory_analysis()``) of one device: arguments (params,
optimizer and rule state, the batch), temporaries, and their sum. Figures are XLA:CPU's plan;
another backend lays out temporaries differently, but the arguments are exact (they are the
shards). Needs 8 devices: run it in a process of its own, which forces 8 CPU devices when jax
is not yet imported::

    python -m benchmarks.mesh_memory                # from experiments/, full table
    python -m benchmarks.mesh_memory --quick        # ViT-S width, 2 blocks: a minute

A row's compilation is one-threaded and took 2.5–15 min on 2 busy cores (the decoder's SAM
step the longest), so the stored table was run as one process per model and mesh, side by side,
from the repo root::

    python -m experiments.benchmarks --only mesh_memory --set 'models=["vit_b16"]' \
        'meshes=["fsdp=8"]' --tag vit_b16_fsdp8 --out results/benchmarks   # ... and so on

and this prints the one table of all such files::

    python -m benchmarks.mesh_memory --tables ../results/benchmarks/mesh_memory_*_*.json
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # 8 devices, before jax starts
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

from typing import Any

import jax
import jax.numpy as jnp
import optax

import sharpjax
from benchmarks import harness
from sharpjax import parallel
from sharpjax.models import get_model, partitioning

TITLE = "Per-device memory of one train step by mesh shape (XLA plan, 8 devices, no run)"
DEFAULTS: dict[str, Any] = {
    "models": ["vit_b16", "transformer_1b"],
    "meshes": ["data=8", "fsdp=8", "data=2,fsdp=4", "data=2,fsdp=2,model=2"],
    "optimizers": ["sgd", "sam", "vasso"],
    "batch_size": 8,
}
QUICK: dict[str, Any] = {
    "models": ["vit_s_2blocks"],
    "meshes": ["data=8", "fsdp=8"],
    "optimizers": ["sgd", "sam"],
    "tag": "quick",
}
# name → (model, abstract input of the whole batch, number of classes)
MODELS = {
    "vit_b16": lambda b: (
        get_model("vit_b", 1000, patch_size=16, scan_blocks=True, remat=True),
        jax.ShapeDtypeStruct((b, 224, 224, 3), jnp.float32),
    ),
    "vit_s_2blocks": lambda b: (
        get_model("vit_s", 10, depth=2, scan_blocks=True, remat=True),
        jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.float32),
    ),
    "transformer_1b": lambda b: (
        get_model("transformer_1b", 32000),
        jax.ShapeDtypeStruct((b, 256), jnp.int32),
    ),
}


def transformation(name: str) -> optax.GradientTransformationExtraArgs:
    base = optax.sgd(0.1, momentum=0.9)
    if name == "sgd":
        return optax.chain(base)
    rule = {"sam": lambda: sharpjax.sam(0.05), "vasso": lambda: sharpjax.vasso(0.05)}[name]
    return optax.chain(rule(), base)


def memory(model_name: str, mesh_spec: str, optimizer: str, batch_size: int) -> dict[str, Any]:
    """XLA's per-device bytes of one step: arguments, temporaries, outputs (aliased)."""
    mesh = parallel.make_train_mesh(mesh_spec)
    model, inputs = MODELS[model_name](batch_size)
    sample = jax.ShapeDtypeStruct((1, *inputs.shape[1:]), inputs.dtype)
    boxed = jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], sample)
    params = partitioning.unbox(boxed)
    tx = transformation(optimizer)
    shardings = parallel.state_shardings(
        tx,
        params,
        {},
        mesh,
        logical_specs=partitioning.logical_partition_specs(boxed),
        rules=partitioning.rules_for_mesh(mesh.axis_names),
    )
    state = parallel.TrainState(params, {}, jax.eval_shape(tx.init, params))
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )

    def loss_fn(p, model_state, batch):
        logits = model.apply({"params": p}, batch[0])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
        return loss, (model_state, {})

    step = parallel.make_sharded_train_step(loss_fn, tx, mesh, shardings=shardings)
    batched = parallel.batch_sharding(mesh)
    batch = (
        jax.ShapeDtypeStruct(inputs.shape, inputs.dtype, sharding=batched),
        jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batched),
    )
    compiled, seconds, _ = harness.compile_seconds(step, state, batch)
    stats = compiled.memory_analysis()
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    arguments, temporaries = int(stats.argument_size_in_bytes), int(stats.temp_size_in_bytes)
    return {
        "name": f"{model_name} {optimizer} {mesh_spec}",
        "model": model_name,
        "mesh": parallel.format_mesh(mesh),
        "optimizer": optimizer,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "param_bytes": int(param_bytes),
        "argument_bytes": arguments,
        "temp_bytes": temporaries,
        "per_device_bytes": arguments + temporaries,
        "compile_s": seconds,
    }


def run(config: dict[str, Any]) -> harness.Record:
    if jax.device_count() < 8:
        raise SystemExit(
            "mesh_memory needs 8 devices: run it in its own process (python -m "
            "benchmarks.mesh_memory), or set XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
    record = harness.new_record("mesh_memory", TITLE, config)
    for model_name in config["models"]:
        for mesh_spec in config["meshes"]:
            for optimizer in config["optimizers"]:
                row = memory(model_name, mesh_spec, optimizer, config["batch_size"])
                record["rows"].append(row)
                print(
                    f"{model_name:15s} {row['mesh']:22s} {optimizer:6s} "
                    f"{row['per_device_bytes'] / 2**30:8.3f} GiB",
                    flush=True,
                )
    return harness.finish(record)


def table(record: harness.Record) -> str:
    rows = record["rows"]
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    keys = list(dict.fromkeys((r["model"], r["mesh"]) for r in rows))
    by = {(r["model"], r["mesh"], r["optimizer"]): r for r in rows}
    columns = [
        ("model", lambda k: k[0]),
        ("mesh (data,fsdp,model)", lambda k: k[1]),
    ]
    for o in optimizers:
        columns.append(
            (
                f"{o} GiB/device",
                lambda k, o=o: harness.fmt(
                    by.get((*k, o), {}).get("per_device_bytes", 0) / 2**30, 3
                ),
            )
        )
    return harness.table(keys, columns)


def merged_table(paths: list[str]) -> str:
    """One table of the rows of several records (e.g. one per model and mesh), in file order."""
    return table({"rows": [row for path in paths for row in harness.read(path)["rows"]]})


if __name__ == "__main__":
    if "--tables" in sys.argv:
        print(merged_table(sys.argv[sys.argv.index("--tables") + 1 :]))
        raise SystemExit
    quick = "--quick" in sys.argv
    config = {**DEFAULTS, **(QUICK if quick else {})}
    result = run(config)
    path = harness.write(result, harness.RESULTS)
    print(table(result))
    print("written", path)
