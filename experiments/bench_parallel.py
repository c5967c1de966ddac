"""Overhead and throughput of the data-parallel SAM steps (sharpjax.parallel).

On one device, the pmap step and the shard_map step (1-device mesh) should cost what the plain
single-device jitted SAM step costs: the collectives over a 1-device axis compile away, and
what is left is dispatch. We time them interleaved (one call of each step in turn, repeated),
so the machine's noise hits every step alike, and report medians, images/s and the ratio of
each parallel step to the plain jitted SAM step (target ≤ 1.05). With several local devices
(GPUs) the script also times the all-device data-parallel steps (SGD, SAM synced, SAM per
device) and reports their images/s; forced CPU devices say nothing about speed.

    python experiments/bench_parallel.py --out results/benchmarks/parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sharpjax
from sharpjax import parallel
from sharpjax.parallel import TrainState

AXIS = "batch"


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a dense head on 32x32x3 images (CIFAR-sized)."""

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


def plain_step(loss_fn: parallel.LossFn, tx, sam: bool) -> Callable:
    """The reference: a hand-written single-device jitted step (no sharpjax.parallel)."""

    def step(params, opt_state, batch):
        loss_only = lambda p: loss_fn(p, {}, batch)[0]
        grads = jax.grad(loss_only)(params)
        if sam:
            updates, opt_state = tx.update(grads, opt_state, params, grad_fn=jax.grad(loss_only))
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def dp_sgd_step(loss_fn: parallel.LossFn, tx, mesh: Mesh) -> Callable:
    """Data-parallel SGD under shard_map (pmean of the local gradients), for throughput only."""

    def body(params, opt_state, batch):
        local = parallel.to_varying(params, AXIS)
        grads = jax.grad(lambda p: loss_fn(p, {}, batch)[0])(local)
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P()))
    return jax.jit(mapped, donate_argnums=(0, 1))


class Runner:
    """One timed step: ``advance()`` runs one step in place and blocks until it is done."""

    def __init__(self, name: str, call: Callable[[], None], images: int):
        self.name, self.call, self.images = name, call, images
        self.times: list[float] = []  # wall-clock seconds per step
        self.cpu_times: list[float] = []  # process CPU seconds per step (all threads)

    def timed(self, inner: int) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(inner):
            self.call()
        self.times.append((time.perf_counter() - start) / inner)
        self.cpu_times.append((time.process_time() - cpu_start) / inner)


def build_runners(args) -> tuple[list[Runner], int]:
    model = SmallCNN() if args.model == "cnn" else SmallMLP()
    loss_fn = make_loss_fn(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=(args.batch_size,)).astype(np.int32)
    params = model.init(jax.random.key(0), x[:1])["params"]
    base = lambda: optax.sgd(0.05, momentum=0.9)
    one = jax.devices()[0]
    runners = []

    # --- 1 device: plain jitted SGD and SAM, and the parallel steps on a 1-device axis.
    batch_one = jax.device_put((x, y), one)
    for name, tx, sam in (
        ("sgd_jit", base(), False),
        ("sam_jit", optax.chain(sharpjax.sam(0.05), base()), True),
    ):
        step = plain_step(loss_fn, tx, sam)
        box = {"state": jax.device_put((params, tx.init(params)), one)}

        def call(step=step, box=box):
            box["state"] = step(*box["state"], batch_one)
            jax.block_until_ready(box["state"])

        runners.append(Runner(name, call, args.batch_size))

    tx = optax.chain(sharpjax.sam(0.05, axis_name=AXIS), base())
    pmap_step = parallel.make_pmap_train_step(loss_fn, tx, AXIS, devices=[one])
    pmap_box = {"state": parallel.replicate(TrainState(params, {}, tx.init(params)), AXIS, [one])}
    pmap_batch = parallel.replicate((x, y), AXIS, [one])  # (1, B, ...) on the device

    def call_pmap():
        pmap_box["state"], _ = pmap_step(pmap_box["state"], pmap_batch)
        jax.block_until_ready(pmap_box["state"])

    runners.append(Runner("sam_pmap_1dev", call_pmap, args.batch_size))

    mesh1 = Mesh(np.array([one]), (AXIS,))
    sm_step = parallel.make_shard_map_train_step(loss_fn, tx, mesh1, AXIS)
    sm_box = {"state": sm_step.init(params, {})}
    sm_batch = sm_step.shard_batch((x, y))

    def call_shard_map():
        sm_box["state"], _ = sm_step(sm_box["state"], sm_batch)
        jax.block_until_ready(sm_box["state"])

    runners.append(Runner("sam_shard_map_1dev", call_shard_map, args.batch_size))

    # --- all local devices (only when there are several; they must be real to mean anything).
    n = jax.local_device_count()
    if n > 1 and jax.process_count() == 1:
        mesh = Mesh(np.array(jax.local_devices()), (AXIS,))
        global_batch = (np.tile(x, (n, 1, 1, 1)), np.tile(y, n))  # per-device batch as above
        sharding = NamedSharding(mesh, P(AXIS))
        batch_all = jax.device_put(global_batch, sharding)
        sgd = base()
        sgd_step = dp_sgd_step(loss_fn, sgd, mesh)
        replicated = NamedSharding(mesh, P())
        sgd_box = {"state": jax.device_put((params, sgd.init(params)), replicated)}

        def call_sgd():
            sgd_box["state"] = sgd_step(*sgd_box["state"], batch_all)
            jax.block_until_ready(sgd_box["state"])

        runners.append(Runner(f"sgd_shard_map_{n}dev", call_sgd, n * args.batch_size))
        for mode in ("synced", "per_device"):
            tx_n = optax.chain(sharpjax.sam(0.05, axis_name=AXIS, perturbation_mode=mode), base())
            step_n = parallel.make_shard_map_train_step(loss_fn, tx_n, mesh, AXIS)
            box = {"state": step_n.init(params, {})}

            def call_n(step_n=step_n, box=box):
                box["state"], _ = step_n(box["state"], batch_all)
                jax.block_until_ready(box["state"])

            runners.append(Runner(f"sam_{mode}_shard_map_{n}dev", call_n, n * args.batch_size))
    return runners, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--batch-size", type=int, default=32, help="per device")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--inner", type=int, default=3, help="steps per timing")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls (compiles) each")
    parser.add_argument("--out", default="results/benchmarks/parallel.json")
    args = parser.parse_args()

    runners, num_devices = build_runners(args)
    print(
        f"{jax.default_backend()}: {num_devices} local device(s), {args.model}, batch "
        f"{args.batch_size} per device, {args.rounds} rounds x {args.inner} steps"
    )
    for runner in runners:
        for _ in range(args.warmup):
            runner.call()
    for _ in range(args.rounds):  # interleaved: one timing of each step per round
        for runner in runners:
            runner.timed(args.inner)

    medians = {r.name: statistics.median(r.times) for r in runners}
    cpu_medians = {r.name: statistics.median(r.cpu_times) for r in runners}
    results = {}
    for r in runners:
        results[r.name] = {
            "median_ms": 1e3 * medians[r.name],
            "images_per_s": r.images / medians[r.name],
            "ratio_to_sam_jit": medians[r.name] / medians["sam_jit"],
            "median_cpu_ms": 1e3 * cpu_medians[r.name],
            "cpu_ratio_to_sam_jit": cpu_medians[r.name] / cpu_medians["sam_jit"],
        }
    ratios = [results[k]["ratio_to_sam_jit"] for k in ("sam_pmap_1dev", "sam_shard_map_1dev")]
    report = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "local_devices": num_devices,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "model": args.model,
        "batch_size_per_device": args.batch_size,
        "rounds": args.rounds,
        "inner_steps": args.inner,
        "results": results,
        "target_overhead_ratio": 1.05,
        "meets_target": max(ratios) <= 1.05,
    }
    print(
        f"{'step':<28}{'median ms':>10}{'images/s':>10}{'ratio':>8}{'cpu ms':>10}{'cpu ratio':>11}"
    )
    for name, row in results.items():
        print(
            f"{name:<28}{row['median_ms']:>10.2f}{row['images_per_s']:>10.0f}"
            f"{row['ratio_to_sam_jit']:>8.3f}{row['median_cpu_ms']:>10.2f}"
            f"{row['cpu_ratio_to_sam_jit']:>11.3f}"
        )
    print(
        f"1-device overhead (pmap, shard_map): {ratios[0]:.3f}, {ratios[1]:.3f}; "
        f"target ≤ 1.05: {'met' if report['meets_target'] else 'NOT met'}"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
