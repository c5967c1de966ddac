"""Overhead of the data-parallel SAM steps (``sharpjax.parallel``) at one device, and their
throughput on several.

On one device the pmap step and the shard_map step (1-device mesh) should cost what the plain
jitted SAM step costs: the collectives over a 1-device axis compile away, and what is left is
dispatch. The harness times them interleaved; the ratios are to the plain jitted SAM step
(target ≤ 1.05). With several local devices (GPUs) it also times the all-device steps (SGD,
SAM synced, SAM per device) for their images/s; forced CPU devices say nothing about speed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sharpjax
from benchmarks import harness
from sharpjax import parallel
from sharpjax.parallel import TrainState

TITLE = "Data-parallel SAM steps against the plain jitted SAM step"
AXIS = "batch"
DEFAULTS: dict[str, Any] = {
    "model": "cnn",
    "batch_size": 32,
    "rounds": 20,
    "window": 3,
    "warmup": 3,
}
QUICK: dict[str, Any] = {"model": "mlp", "batch_size": 8, "rounds": 2, "window": 1, "warmup": 1}


class SmallCNN(nn.Module):
    """Two 3×3 convolutions and a dense head on 32×32×3 images (CIFAR-sized)."""

    width: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class SmallMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(10)(nn.relu(nn.Dense(256)(x)))


def make_loss_fn(model: nn.Module) -> parallel.LossFn:
    def loss_fn(params, model_state, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (model_state, {})

    return loss_fn


def plain_step(loss_fn: parallel.LossFn, tx, sam: bool):
    """The reference: a hand-written single-device jitted step (no sharpjax.parallel)."""

    def step(params, opt_state, batch):
        loss_only = lambda p: loss_fn(p, {}, batch)[0]
        grads = jax.grad(loss_only)(params)
        extra = {"grad_fn": jax.grad(loss_only)} if sam else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


class Box:
    """A step with its state, advanced one step per call (for the harness)."""

    def __init__(self, step, state, batch, unpack: bool):
        self.step, self.state, self.batch, self.unpack = step, state, batch, unpack

    def __call__(self):
        if self.unpack:
            self.state = self.step(*self.state, self.batch)
        else:
            self.state, _ = self.step(self.state, self.batch)
        return self.state


def build(config: dict[str, Any]) -> tuple[dict[str, Box], dict[str, int], int]:
    model = SmallCNN() if config["model"] == "cnn" else SmallMLP()
    loss_fn = make_loss_fn(model)
    rng = np.random.default_rng(0)
    b = config["batch_size"]
    x = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=(b,)).astype(np.int32)
    params = model.init(jax.random.key(0), x[:1])["params"]
    base = lambda: optax.sgd(0.05, momentum=0.9)
    one = jax.devices()[0]
    boxes, images = {}, {}
    batch_one = jax.device_put((x, y), one)
    for name, tx, sam in (
        ("sgd_jit", base(), False),
        ("sam_jit", optax.chain(sharpjax.sam(0.05), base()), True),
    ):
        state = jax.device_put((params, tx.init(params)), one)
        boxes[name] = Box(plain_step(loss_fn, tx, sam), state, batch_one, unpack=True)
    tx = optax.chain(sharpjax.sam(0.05, axis_name=AXIS), base())
    pmap_step = parallel.make_pmap_train_step(loss_fn, tx, AXIS, devices=[one])
    state = parallel.replicate(TrainState(params, {}, tx.init(params)), AXIS, [one])
    batch = parallel.replicate((x, y), AXIS, [one])  # (1, B, ...) on the device
    boxes["sam_pmap_1dev"] = Box(pmap_step, state, batch, unpack=False)
    mesh1 = Mesh(np.array([one]), (AXIS,))
    sm_step = parallel.make_shard_map_train_step(loss_fn, tx, mesh1, AXIS)
    boxes["sam_shard_map_1dev"] = Box(
        sm_step, sm_step.init(params, {}), sm_step.shard_batch((x, y)), unpack=False
    )
    images = dict.fromkeys(boxes, b)

    n = jax.local_device_count()
    if n > 1 and jax.process_count() == 1:  # only meaningful on real devices
        mesh = Mesh(np.array(jax.local_devices()), (AXIS,))
        batch_all = jax.device_put(
            (np.tile(x, (n, 1, 1, 1)), np.tile(y, n)), NamedSharding(mesh, P(AXIS))
        )
        for mode in ("synced", "per_device"):
            tx_n = optax.chain(sharpjax.sam(0.05, axis_name=AXIS, perturbation_mode=mode), base())
            step_n = parallel.make_shard_map_train_step(loss_fn, tx_n, mesh, AXIS)
            name = f"sam_{mode}_shard_map_{n}dev"
            boxes[name] = Box(step_n, step_n.init(params, {}), batch_all, unpack=False)
            images[name] = n * b
    return boxes, images, n


def run(config: dict[str, Any]) -> harness.Record:
    record = harness.new_record("parallel", TITLE, config, reference="sam_jit")
    boxes, images, n = build(config)
    times, loads = harness.interleaved(boxes, config["rounds"], config["window"], config["warmup"])
    extra = {
        name: {"model": config["model"], "images_per_s": images[name] / float(np.median(t))}
        for name, t in times.items()
    }
    record["rows"] = harness.timing_rows(times, "sam_jit", extra)
    record["config"]["local_devices"] = n
    print(table(record), flush=True)
    return harness.finish(record, loads)


def table(record: harness.Record) -> str:
    columns = [
        ("step", lambda r: r["name"]),
        ("/ jitted SAM", harness.ratio_cell),
        ("images/s", lambda r: f"{r['images_per_s']:.0f}"),
    ]
    return harness.table(record["rows"], columns)
