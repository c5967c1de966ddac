"""Throughput of the trainer (sharpjax.train) against a minimal hand-written jitted loop.

CPU section (``--section cpu``): the trainer's examples/s against a hand-written loop over
the same model, optimizer (``make_optimizer``, so the same optax chain) and batches
(``iterate_batches``): ``jax.jit`` of value_and_grad + ``tx.update(..., grad_fn=...)`` +
``apply_updates`` with donated state, fed NumPy batches. Runs alternate (trainer, hand loop,
trainer, ...), each a few epochs; an epoch's time is the trainer's ``train_time`` (no
evaluation) or the hand loop's wall time to its last ``block_until_ready``; the first epoch of
every run is dropped (compilation, warm-up) and we report medians and their ratio
(target: trainer / hand ≥ 0.95).

Precision section (``--section precision``): final test accuracy of float32 and bfloat16
(``mixed_precision=True``) runs of the same config over ``--seeds`` seeds, and the paired
difference (same seed: same init and batch order).

GPU section (``--section gpu``, one command on a machine with a GPU): ResNet-18 on
CIFAR-shaped synthetic data (32x32x3, 10 classes), batch 128 and 512, float32 and bfloat16:
images/s of SGD, SAM and mSAM (m = 4) through :func:`sharpjax.parallel.make_train_step`
jitted on a mesh of every device, the SAM/SGD throughput ratio (target ≥ 0.48), and the
fraction of time the device waits on the host: ``1 − t(data already on device) / t(batches
sent from host memory every step, double-buffered as the trainer does)``. The device name is
recorded with every figure.

    python -m experiments.benchmarks --only trainer
    python -m experiments.benchmarks --only trainer --set section=gpu --tag gpu
    python -m experiments.benchmarks --only trainer --set section=precision epochs=20 --tag bf16
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from sharpjax import parallel
from sharpjax.data import iterate_batches, load_dataset, prefetch_to_mesh
from sharpjax.train import TrainConfig, train
from sharpjax.train.config import make_optimizer
from sharpjax.train.loop import build_model, init_model


def device_name() -> str:
    d = jax.devices()[0]
    return f"{jax.device_count()} x {getattr(d, 'device_kind', d.platform)}"


# --------------------------------------------------------------------------------------
# CPU: trainer vs hand-written loop.
# --------------------------------------------------------------------------------------


def hand_loop_epochs(config: TrainConfig, dataset, epochs: int) -> list[float]:
    """Seconds per epoch of the minimal loop (same model, chain, batches, donation)."""
    model = build_model(config, dataset.num_classes)
    steps = len(dataset.x_train) // config.batch_size
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    tx = make_optimizer(config, steps)
    params, _ = init_model(model, dataset.x_train, config.seed)
    opt_state = tx.init(params)

    def loss(p, x, y):
        logits = model.apply({"params": p}, x, train=True).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        grad_fn = lambda p: jax.grad(loss)(p, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state, value

    step = jax.jit(step, donate_argnums=(0, 1))
    params, opt_state = jax.tree.map(jnp.array, (params, opt_state))
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        batches = iterate_batches(
            dataset.x_train, dataset.y_train, batch_size=config.batch_size, seed=0, epoch=epoch
        )
        total = jnp.zeros([])
        for xb, yb in itertools.islice(batches, steps):
            params, opt_state, value = step(params, opt_state, xb, yb)
            total = total + value
        jax.block_until_ready((params, total))
        times.append(time.perf_counter() - start)
    return times


def cpu_section(args) -> dict:
    dataset = load_dataset(args.dataset)
    config = TrainConfig(
        dataset=args.dataset,
        model=args.model,
        model_kwargs=json.loads(args.model_kwargs),
        optimizer=args.optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_every=10**6,
        progress=False,
        lr_schedule="constant",
    )
    trainer, hand = [], []
    for _ in range(args.repeats):
        result = train(config, dataset)
        trainer += [r["train_time"] for r in result.history[1:]]
        hand += hand_loop_epochs(config, dataset, args.epochs)[1:]
    steps = len(dataset.x_train) // config.batch_size
    examples = steps * config.batch_size
    t_trainer, t_hand = statistics.median(trainer), statistics.median(hand)
    out = {
        "device": device_name(),
        "config": config.to_dict(),
        "examples_per_epoch": examples,
        "trainer_examples_per_s": examples / t_trainer,
        "hand_loop_examples_per_s": examples / t_hand,
        "ratio_trainer_over_hand": t_hand / t_trainer,
        "epoch_times_trainer": trainer,
        "epoch_times_hand": hand,
    }
    print(
        f"[{out['device']}] {args.model} {args.optimizer} batch {args.batch_size}: trainer "
        f"{out['trainer_examples_per_s']:.0f} ex/s, hand loop {out['hand_loop_examples_per_s']:.0f}"
        f" ex/s, ratio {out['ratio_trainer_over_hand']:.3f} (target >= 0.95)"
    )
    return out


# --------------------------------------------------------------------------------------
# GPU: ResNet-18 images/s.
# --------------------------------------------------------------------------------------


def timed_steps(step, state, batches):
    """Runs ``step`` over ``batches``; returns the state and the wall time to the last result."""
    start = time.perf_counter()
    for b in batches:
        state, _ = step(state, b)
    jax.block_until_ready(state)
    return state, time.perf_counter() - start


def gpu_section(args) -> dict:
    from sharpjax.models import get_model

    mesh = parallel.make_mesh(None)
    rows = []
    for batch_size, precision in itertools.product(args.gpu_batch_sizes, ("f32", "bf16")):
        dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
        model = get_model("resnet18", 10, dtype=dtype)
        rng = np.random.default_rng(0)
        host = [
            (
                rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
                rng.integers(0, 10, batch_size).astype(np.int32),
            )
            for _ in range(4)
        ]
        variables = model.init(jax.random.key(0), jnp.asarray(host[0][0][:1]), train=False)
        params, stats = variables["params"], variables.get("batch_stats", {})

        def loss_fn(p, s, batch, model=model):
            x, y = batch
            logits, new = model.apply(
                {"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
            return loss.mean(), (new["batch_stats"], {})

        per = {}
        for name in ("sgd", "sam", "msam"):
            config = TrainConfig(optimizer=name, num_microbatches=4, batch_size=batch_size)
            m = 4 if name == "msam" else 1
            tx = make_optimizer(config, 100, num_microbatches=m)
            step = jax.jit(
                parallel.make_train_step(loss_fn, tx, num_microbatches=m), donate_argnums=(0,)
            )
            state = parallel.replicate_on(mesh, parallel.TrainState(params, stats, tx.init(params)))
            on_device = [parallel.shard_batch(mesh, b) for b in host]
            for b in on_device[:2]:  # compile and warm up
                state, _ = step(state, b)
            jax.block_until_ready(state)
            resident, fed = [], []
            for _ in range(args.repeats):  # interleaved
                feed = itertools.islice(itertools.cycle(on_device), args.steps)
                state, t = timed_steps(step, state, feed)
                resident.append(t)
                feed = prefetch_to_mesh(itertools.islice(itertools.cycle(host), args.steps), mesh)
                state, t = timed_steps(step, state, feed)
                fed.append(t)
            t_res, t_fed = statistics.median(resident), statistics.median(fed)
            per[name] = {
                "images_per_s": args.steps * batch_size / t_fed,
                "images_per_s_data_on_device": args.steps * batch_size / t_res,
                "host_wait_fraction": max(0.0, 1.0 - t_res / t_fed),
            }
        row = {
            "device": device_name(),
            "batch_size": batch_size,
            "precision": precision,
            **{f"{k}_{name}": v for name, d in per.items() for k, v in d.items()},
            "sam_over_sgd": per["sam"]["images_per_s"] / per["sgd"]["images_per_s"],
            "msam_over_sgd": per["msam"]["images_per_s"] / per["sgd"]["images_per_s"],
        }
        rows.append(row)
        print(
            f"[{row['device']}] ResNet-18 batch {batch_size} {precision}: "
            + ", ".join(f"{n} {per[n]['images_per_s']:.0f} img/s" for n in per)
            + f", SAM/SGD {row['sam_over_sgd']:.3f} (target >= 0.48), host wait "
            + ", ".join(f"{n} {per[n]['host_wait_fraction']:.1%}" for n in per)
        )
    return {"rows": rows}


# --------------------------------------------------------------------------------------
# Mixed precision: does bf16 SAM train as well as float32? (accuracy, not speed)
# --------------------------------------------------------------------------------------


def precision_section(args) -> dict:
    dataset = load_dataset(args.dataset)
    rows = {}
    for precision in ("f32", "bf16"):
        finals = []
        for seed in range(args.seeds):
            config = TrainConfig(
                dataset=args.dataset,
                model=args.model,
                model_kwargs=json.loads(args.model_kwargs),
                optimizer=args.optimizer,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=seed,
                mixed_precision=precision == "bf16",
                eval_every=args.epochs,
                progress=False,
            )
            finals.append(train(config, dataset).final["test_accuracy"])
        rows[precision] = finals
    paired = np.array(rows["bf16"]) - np.array(rows["f32"])
    out = {
        "device": device_name(),
        "command_args": vars(args),
        "test_accuracy": rows,
        "bf16_minus_f32_mean": float(paired.mean()),
        "bf16_minus_f32_std": float(paired.std(ddof=1)) if len(paired) > 1 else 0.0,
    }
    print(
        f"[{out['device']}] {args.optimizer} {args.model} on {args.dataset}, {args.epochs} epochs,"
        f" {args.seeds} seeds: f32 {np.mean(rows['f32']):.4f} ± {np.std(rows['f32'], ddof=1):.4f},"
        f" bf16 {np.mean(rows['bf16']):.4f} ± {np.std(rows['bf16'], ddof=1):.4f}, paired "
        f"bf16 − f32 {out['bf16_minus_f32_mean']:+.4f} ± {out['bf16_minus_f32_std']:.4f}"
    )
    return out


TITLE = "The trainer against a hand-written loop (CPU), ResNet-18 images/s (GPU), bf16 accuracy"
DEFAULTS: dict[str, Any] = {
    "section": "cpu",  # cpu, gpu, all or precision
    "seeds": 3,  # precision: seeds per precision
    "dataset": "mnist1d",
    "model": "cnn1d",
    "model_kwargs": "{}",
    "optimizer": "sam",
    "batch_size": 128,
    "epochs": 3,  # per run; the first is dropped
    "repeats": 3,
    "steps": 50,  # GPU: steps per timing
    "gpu_batch_sizes": [128, 512],
}
QUICK: dict[str, Any] = {"epochs": 2, "repeats": 1, "model_kwargs": '{"features": [4]}'}


def run(config: dict[str, Any]) -> harness.Record:
    args = SimpleNamespace(**config)
    record = harness.new_record("trainer", TITLE, config)
    on_cpu = jax.devices()[0].platform == "cpu"
    if config["section"] == "precision":
        record["rows"].append({"name": "precision", **precision_section(args)})
    if config["section"] in ("cpu", "all"):
        record["rows"].append({"name": "cpu", **cpu_section(args)})
    if config["section"] in ("gpu", "all"):
        if on_cpu:
            record["notes"].append("No GPU here: the GPU section needs one.")
            print(record["notes"][-1])
        else:
            record["rows"] += [
                {"name": f"gpu {r['batch_size']} {r['precision']}", **r}
                for r in gpu_section(args)["rows"]
            ]
    return harness.finish(record)


def table(record: harness.Record) -> str:
    cpu = [r for r in record["rows"] if r["name"] == "cpu"]
    gpu = [r for r in record["rows"] if r["name"].startswith("gpu")]
    text = ""
    if cpu:
        text += harness.table(
            cpu,
            [
                ("device", lambda r: r["device"]),
                ("trainer examples/s", lambda r: f"{r['trainer_examples_per_s']:.0f}"),
                ("hand loop examples/s", lambda r: f"{r['hand_loop_examples_per_s']:.0f}"),
                ("trainer / hand loop", lambda r: f"{r['ratio_trainer_over_hand']:.3f}"),
            ],
        )
    if gpu:
        text += harness.table(
            gpu,
            [
                ("device", lambda r: r["device"]),
                ("batch", lambda r: r["batch_size"]),
                ("precision", lambda r: r["precision"]),
                ("SGD images/s", lambda r: f"{r['images_per_s_sgd']:.0f}"),
                ("SAM images/s", lambda r: f"{r['images_per_s_sam']:.0f}"),
                ("SAM / SGD", lambda r: f"{r['sam_over_sgd']:.3f}"),
                ("host wait (SAM)", lambda r: f"{r['host_wait_fraction_sam']:.1%}"),
            ],
        )
    return text
