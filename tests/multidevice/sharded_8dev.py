"""The trainer with params sharded over the mesh, against 1 device (run in a subprocess).

Usage: ``python -m tests.multidevice.sharded_8dev OUT.json``. 8 forced CPU devices. Writes
``{check: value}``: max absolute differences between the final params / per-epoch losses of
trainer runs that differ only in their mesh, the shapes of the devices' shards, the per-device
memory XLA plans for a ViT-S step, and the messages of the bad-input errors;
tests/test_train_sharded.py asserts on them.
"""

from __future__ import annotations

import os

from tests.multidevice.runner import cpu_device_flags

os.environ["XLA_FLAGS"] = cpu_device_flags(8)

import json
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sharpjax
from sharpjax import parallel
from sharpjax.data import Dataset
from sharpjax.models import get_model
from sharpjax.train import TrainConfig, train

N = 8
MESH = "data=2,fsdp=4"
RULES = ("sam", "asam", "vasso", "saner", "gsam", "looksam")


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])


def diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)))


def images(num_train: int = 64, num_test: int = 32, side: int = 8) -> Dataset:
    """Small random images with a learnable position-dependent signal (10 classes)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_train + num_test, side, side, 3)).astype(np.float32)
    y = rng.integers(0, 10, num_train + num_test).astype(np.int32)
    x[np.arange(len(y)), y % side, (3 * y) % side, :] += 3.0
    tr, te = slice(0, num_train), slice(num_train, None)
    return Dataset("synthetic", x[tr], y[tr], y[tr], x[te], y[te], 10)


def modular_sums(p: int = 16, num_train: int = 64, num_test: int = 32) -> Dataset:
    """Tokens ``(a, b, =)`` → ``(a + b) mod p`` (``=`` is token ``p``), random pairs."""
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, p, (2, num_train + num_test))
    x = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)
    y = ((a + b) % p).astype(np.int32)
    tr, te = slice(0, num_train), slice(num_train, None)
    return Dataset("modular", x[tr], y[tr], y[tr], x[te], y[te], p)


def config(**changes) -> TrainConfig:
    values = dict(
        dataset="cifar10",  # recorded only: the data are passed in
        model="vit_micro",
        model_kwargs={"depth": 1},
        optimizer="sam",
        epochs=1,
        batch_size=16,
        max_steps_per_epoch=3,
        learning_rate=0.05,
        lr_schedule="constant",
        progress=False,
    )
    values.update(changes)
    return TrainConfig(**values)


def run_pair(r: dict, name: str, data: Dataset, **changes) -> tuple:
    one = train(config(num_devices=1, **changes), data)
    many = train(config(mesh=MESH, **changes), data)
    r[f"{name}_params"] = diff(flat(one.params), flat(many.params))
    r[f"{name}_batch_stats"] = (
        diff(flat(one.batch_stats), flat(many.batch_stats)) if one.batch_stats else 0.0
    )
    r[f"{name}_loss"] = diff(one.history[-1]["train_loss"], many.history[-1]["train_loss"])
    r[f"{name}_param_scale"] = float(np.max(np.abs(flat(one.params))))
    return one, many


def shard_shapes(tree) -> list:
    """(global shape, one device's shard shape, spec) of every leaf."""
    return [
        [list(x.shape), list(x.addressable_shards[0].data.shape), str(x.sharding.spec)]
        for x in jax.tree.leaves(tree)
    ]


def error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return str(err)
    return "no error"


def memory(mesh_spec: str) -> dict:
    """XLA's per-device bytes for the SAM step of ViT-S (abstract shapes, compile only).

    ViT-S itself (width 384, 6 heads, MLP 1536, depth 12) with its blocks scanned and
    rematerialised, the layout its docstring gives for fsdp; only the input is small (32×32
    images, patch 4: 65 tokens; 10 classes). With the blocks scanned, XLA compiles one block
    whatever the depth, so the real depth costs what depth 2 unrolled did.
    """
    mesh = parallel.make_train_mesh(mesh_spec)
    model = get_model("vit_s", 10, scan_blocks=True, remat=True)
    sample = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    from sharpjax.models import partitioning

    boxed = jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], sample)
    params = partitioning.unbox(boxed)
    tx = optax.chain(sharpjax.sam(0.05), optax.sgd(0.1, momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sh = parallel.state_shardings(
            tx,
            params,
            {},
            mesh,
            logical_specs=partitioning.logical_partition_specs(boxed),
            rules=partitioning.rules_for_mesh(mesh.axis_names),
        )
    state = parallel.TrainState(params, {}, jax.eval_shape(tx.init, params))
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state,
        sh,
    )

    def loss_fn(p, model_state, batch):
        logits = model.apply({"params": p}, batch[0])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
        return loss, (model_state, {})

    step = parallel.make_sharded_train_step(loss_fn, tx, mesh, shardings=sh)
    batched = parallel.batch_sharding(mesh)
    batch = (
        jax.ShapeDtypeStruct((N, 32, 32, 3), jnp.float32, sharding=batched),
        jax.ShapeDtypeStruct((N,), jnp.int32, sharding=batched),
    )
    stats = step.lower(state, batch).compile().memory_analysis()
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return {
        "arguments": int(stats.argument_size_in_bytes),
        "temporaries": int(stats.temp_size_in_bytes),
        "param_bytes": int(param_bytes),
    }


def main(out_path: str) -> None:
    assert jax.device_count() == N, jax.devices()
    r: dict = {}
    data = images()

    # Synced mode on data=2 × fsdp=4 == 1 device, for every rule, on a tiny ViT.
    sharded = {}
    for rule in RULES:
        print(rule, flush=True)
        _, sharded[rule] = run_pair(r, f"vit_{rule}", data, optimizer=rule)
    # Params and VaSSO's d and momentum: each leaf split as planned.
    r["vit_param_shards"] = shard_shapes(sharded["vasso"].params)
    r["vit_opt_shards"] = shard_shapes(sharded["vasso"].opt_state)
    # ... and on a ResNet with BatchNorm (tiny width).
    print("resnet", flush=True)
    resnet = {"model": "resnet18", "model_kwargs": {"stage_sizes": [1, 1], "width": 0.125}}
    _, many = run_pair(r, "resnet_sam", data, optimizer="sam", **resnet)
    r["resnet_param_shards"] = shard_shapes(many.params)

    # Tensor parallel: data=2 × model=4 on the small decoder (heads and MLP split 4 ways).
    print("tensor parallel", flush=True)
    tokens = modular_sums()
    tp = {"model": "transformer_tiny", "model_kwargs": {}}
    one = train(config(num_devices=1, **tp), tokens)
    many = train(config(mesh="data=2,model=4", **tp), tokens)
    r["tp_params"] = diff(flat(one.params), flat(many.params))
    r["tp_loss"] = diff(one.history[-1]["train_loss"], many.history[-1]["train_loss"])
    r["tp_param_shards"] = shard_shapes(many.params)

    # Per-device mode on data=2 × fsdp=4: one ε per replica == mSAM with m = 2 on 1 device.
    print("per_device", flush=True)
    per_replica = train(config(mesh=MESH, perturbation_mode="per_device"), data)
    msam2 = train(config(optimizer="msam", num_microbatches=2, num_devices=1), data)
    r["per_device_vs_msam2"] = diff(flat(per_replica.params), flat(msam2.params))
    r["per_device_vs_synced"] = diff(flat(per_replica.params), flat(sharded["sam"].params))

    # Saved on 8 devices (data=2 × fsdp=4), resumed on 4 (data=2 × fsdp=2): the
    # uninterrupted run's result, the state restored onto the new mesh's layout.
    print("resume", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(optimizer="vasso", epochs=2, checkpoint_every=1)
        straight = train(cfg.replace(mesh=MESH, workdir=os.path.join(tmp, "a")), data)
        workdir = os.path.join(tmp, "b")
        stopped = train(cfg.replace(mesh=MESH, workdir=workdir, stop_after_epochs=1), data)
        resumed = train(cfg.replace(workdir=workdir, num_devices=4, mesh="data=2,fsdp=2"), data)
        r["resume_on_4_params"] = diff(flat(straight.params), flat(resumed.params))
        r["resume_on_4_epochs"] = len(resumed.history)
        r["resume_on_4_shards"] = shard_shapes(resumed.params)
        r["resume_on_4_opt_shards"] = shard_shapes(resumed.opt_state)
        with open(os.path.join(workdir, "config.json")) as f:
            saved = json.load(f)
        r["resume_on_4_recorded"] = [saved["num_devices"], saved["mesh"]]
        r["resume_moved"] = diff(flat(straight.params), flat(stopped.params))

    # Bad input, before anything compiles.
    r["bad_mesh_product"] = error(lambda: train(config(mesh="data=2,fsdp=8"), data))
    r["bad_mesh_axis"] = error(lambda: config(mesh="data=2,tensor=4"))
    r["bad_mode"] = error(
        lambda: train(config(mesh="fsdp=8", perturbation_mode="per_device"), data)
    )
    r["bad_group"] = error(
        lambda: train(config(mesh=MESH, perturbation_mode="grouped", group_size=2), data)
    )
    r["bad_batch"] = error(lambda: config(mesh=MESH, batch_size=12))
    r["bad_model_axis"] = error(
        lambda: train(
            config(model="mlp", model_kwargs={"hidden_sizes": [16]}, mesh="data=2,model=4"), data
        )
    )

    # Memory: the SAM step of ViT-S, fsdp=8 against replicated (data=8).
    print("memory", flush=True)
    r["memory_fsdp8"] = memory("fsdp=8")
    r["memory_data8"] = memory("data=8")

    with open(out_path, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
