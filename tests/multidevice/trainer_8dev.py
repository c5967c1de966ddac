"""The trainer on 8 forced CPU devices against the trainer on 1 device (run in a subprocess).

Usage: ``python -m tests.multidevice.trainer_8dev OUT.json``. Writes ``{check: value}``: max
absolute differences between final params / statistics / per-epoch metrics of runs that
differ only in their device count or mode, final metrics of the mixed-precision runs, and the
messages of the bad-input errors; tests/test_train_parallel.py asserts on them.
"""

from __future__ import annotations

import os

from tests.multidevice.runner import cpu_device_flags

os.environ["XLA_FLAGS"] = cpu_device_flags(8)  # before jax is imported

import json
import sys
import tempfile

import flax.linen as nn
import jax
import numpy as np

from sharpjax.data import Dataset, load_dataset
from sharpjax.train import TrainConfig, train
from tests.multidevice.common import diff, flat

N = 8


class BNNet(nn.Module):
    """Dense → BatchNorm → ReLU → Dense: BatchNorm statistics over the (global) batch."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(16)(x)))
        return nn.Dense(self.num_classes)(x)


def history_diff(a, b, key: str) -> float:
    return diff([r[key] for r in a.history], [r[key] for r in b.history])


def config(**changes) -> TrainConfig:
    values = dict(
        dataset="digits",
        model="mlp",
        model_kwargs={"hidden_sizes": [16]},
        optimizer="sam",
        epochs=2,
        batch_size=64,
        max_steps_per_epoch=3,
        learning_rate=0.05,
        progress=False,
    )
    values.update(changes)
    return TrainConfig(**values)


def compare(r: dict, name: str, one, many) -> None:
    print(name, flush=True)
    r[f"{name}_params"] = diff(flat(one.params), flat(many.params))
    r[f"{name}_batch_stats"] = diff(flat(one.batch_stats), flat(many.batch_stats))
    r[f"{name}_train_loss"] = history_diff(one, many, "train_loss")
    r[f"{name}_test_loss"] = history_diff(one, many, "test_loss")
    r[f"{name}_grad_norm"] = history_diff(one, many, "grad_norm")


def images32(num_train: int = 128, num_test: int = 64) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_train + num_test, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, num_train + num_test).astype(np.int32)
    x[np.arange(len(y)), 4 + y, 4 + y, :] += 3.0  # a learnable, position-dependent signal
    tr, te = slice(0, num_train), slice(num_train, None)
    return Dataset("synthetic32", x[tr], y[tr], y[tr], x[te], y[te], 10)


def error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return str(err)
    return "no error"


def main(out_path: str) -> None:
    assert jax.device_count() == N, jax.devices()
    r: dict = {}
    digits = load_dataset("digits")

    # Synced mode: 8 devices == 1 device on the same global batch.
    one = train(config(num_devices=1), digits, model=BNNet())
    many = train(config(num_devices=N), digits, model=BNNet())
    compare(r, "bn", one, many)
    r["bn_param_scale"] = float(np.max(np.abs(flat(one.params))))
    r["bn_stats_moved"] = diff(flat(one.batch_stats), 0.0 * flat(one.batch_stats))

    data32 = images32()
    cfg = config(dataset="cifar10", augment=True, batch_size=32, max_steps_per_epoch=4)
    one = train(cfg.replace(num_devices=1), data32)
    compare(r, "augment", one, train(cfg, data32))
    r["augment_vs_plain"] = diff(
        flat(one.params), flat(train(cfg.replace(augment=False), data32).params)
    )

    cfg = config(num_micro_steps=2, grad_noise_std=0.01)
    one = train(cfg.replace(num_devices=1), digits, model=BNNet())
    compare(r, "accumulation", one, train(cfg, digits, model=BNNet()))
    r["accumulation_vs_plain"] = diff(
        flat(one.params),
        flat(train(cfg.replace(num_micro_steps=1, num_devices=1), digits, model=BNNet()).params),
    )

    # Per-device mode on 8 devices == mSAM with m = 8 on one device.
    per_device = train(config(perturbation_mode="per_device"), digits)
    msam8 = train(config(optimizer="msam", num_microbatches=N, num_devices=1), digits)
    synced = train(config(), digits)
    compare(r, "per_device_vs_msam8", msam8, per_device)
    r["per_device_vs_synced"] = diff(flat(per_device.params), flat(synced.params))
    grouped = train(config(perturbation_mode="grouped", group_size=2), digits)
    msam4 = train(config(optimizer="msam", num_microbatches=4, num_devices=1), digits)
    compare(r, "grouped2_vs_msam4", msam4, grouped)

    # Resume after an interruption is bit-identical on 8 devices.
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(epochs=3, checkpoint_every=1)
        straight = train(cfg.replace(workdir=os.path.join(tmp, "a")), digits, model=BNNet())
        stopped = cfg.replace(workdir=os.path.join(tmp, "b"))
        train(stopped.replace(stop_after_epochs=1), digits, model=BNNet())
        resumed = train(stopped, digits, model=BNNet())
        r["resume_params"] = diff(flat(straight.params), flat(resumed.params))
        r["resume_batch_stats"] = diff(flat(straight.batch_stats), flat(resumed.batch_stats))
        r["resume_history_equal"] = [
            {k: v for k, v in h.items() if not k.endswith("_time")} for h in straight.history
        ] == [{k: v for k, v in h.items() if not k.endswith("_time")} for h in resumed.history]

    # Mixed precision on 8 devices against float32 on 8 devices (digits, 3 seeds).
    for precision in ("f32", "bf16"):
        finals, firsts, finite = [], [], True
        for seed in range(3):
            cfg = config(
                model_kwargs={"hidden_sizes": [64]},
                epochs=4,
                max_steps_per_epoch=None,
                seed=seed,
                mixed_precision=precision == "bf16",
            )
            res = train(cfg, digits)
            finite &= all(np.isfinite(h["train_loss"]) for h in res.history)
            finite &= bool(np.all(np.isfinite(flat(res.params))))
            finals.append(res.final["test_accuracy"])
            firsts.append((res.history[0]["train_loss"], res.history[-1]["train_loss"]))
        r[f"{precision}_test_accuracy"] = finals
        r[f"{precision}_train_loss_first_last"] = firsts
        r[f"{precision}_finite"] = bool(finite)

    # Bad input, before anything compiles.
    r["bad_batch_for_devices"] = error(lambda: train(config(batch_size=60), digits))
    r["bad_num_devices"] = error(lambda: train(config(num_devices=16), digits))
    r["bad_group_size"] = error(
        lambda: train(config(perturbation_mode="grouped", group_size=3), digits)
    )

    with open(out_path, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
