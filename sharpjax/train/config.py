"""Training configuration: one plain dataclass, command-line overrides, the optimizer.

A run is fully described by a :class:`TrainConfig`; ``config.json`` in the run's workdir holds
it. Overrides from the command line::

    config = config_from_args(["--optimizer=saner", "--rho", "0.1", "--epochs=200"])

:func:`make_optimizer` turns a config into the optax chain the loop uses::

    sharpness-aware transformation (sam, asam, vasso, saner, gsam, msam, noise-resistant)
    -> add_decayed_weights(weight_decay)     # outside the perturbation (docs/algorithms.md)
    -> sgd(lr schedule, momentum)            # or adamw(lr schedule, weight_decay)
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import inspect
import json
import math
import re
import textwrap
import types
import typing
from collections.abc import Sequence
from typing import Any

import optax

import sharpjax

# Names of the training methods. "sgd" and "adamw" are the plain base optimizers; every
# other name puts a sharpness-aware transformation in front of the base optimizer.
# The efficient variants whose policy decides before the step (every k steps, a random draw),
# and the one that decides from the step's clean gradient: on CPU the trainer runs them without
# lax.cond, as programs chosen on the host (sharpjax.train.loop.make_train_step).
DECIDED_AHEAD = ("looksam", "random_sam", "saner_random_sam", "late_phase_sam")
DECIDED_FROM_GRADIENT = ("ae_sam",)
OPTIMIZERS = (
    "sgd",
    "adamw",
    "sam",
    "asam",
    "vasso",
    "saner",
    "saner_vasso",
    "saner_asam",
    "gsam",
    "msam",
    "noise_resistant_sam",
    # efficient variants (sharpjax.efficient), each with its paper's defaults; esam is its
    # stochastic weight perturbation only (the loop passes no per-example losses).
    "looksam",
    "random_sam",
    "ae_sam",
    "saner_random_sam",
    "esam",
    # recent rules (docs/algorithms.md "Recent rules"), each with its paper's defaults;
    # lookbehind_sam replaces the base optimizer (its fast weights step with it, k = 2 times
    # per step).
    "fsam",
    "wsam",
    "late_phase_sam",
    "sampa",
    "lookbehind_sam",
    # Momentum-SAM replaces the base optimizer (it owns the momentum): one gradient per step,
    # at the params perturbed against the momentum; the loop holds those perturbed params.
    "momentum_sam",
)
BASE_OPTIMIZERS = ("sgd", "adamw")
# The optimizers that take no ε of their own per batch: no perturbation micro-batches.
ONE_GRADIENT = (*BASE_OPTIMIZERS, "momentum_sam")
# The recent rules that are whole optimizers or keep their own gradients: no micro-batches.
NO_MICROBATCHES = ("sampa", "lookbehind_sam")
LR_SCHEDULES = ("constant", "cosine", "step")
NOISE_KINDS = ("none", "symmetric", "asymmetric")
PERTURBATION_MODES = ("synced", "per_device", "grouped")

# The papers' default radius of each method (the constructors' defaults, see optimizers.py).
DEFAULT_RHO = {
    "sam": 0.05,
    "asam": 0.5,
    "vasso": 0.1,
    "saner": 0.1,
    "saner_vasso": 0.1,
    "saner_asam": 0.5,
    "gsam": 0.05,
    "msam": 0.05,
    "noise_resistant_sam": 0.05,
    "looksam": 0.05,
    "random_sam": 0.05,
    "ae_sam": 0.05,
    "saner_random_sam": 0.1,
    "esam": 0.05,
    "fsam": 0.05,
    "wsam": 0.05,
    "late_phase_sam": 0.05,
    "sampa": 0.05,
    "lookbehind_sam": 0.05,
    "momentum_sam": 0.3,
}
# SANER's multiplier on masked elements (paper: 0.5); GSAM's α (paper: 0.01 to 0.3).
DEFAULT_ALPHA = {
    "saner": 0.5,
    "saner_vasso": 0.5,
    "saner_asam": 0.5,
    "saner_random_sam": 0.5,
    "gsam": 0.1,
    "looksam": 0.7,
}

SHARPNESS_AWARE = tuple(name for name in OPTIMIZERS if name not in BASE_OPTIMIZERS)
# The methods that report the cosine between g and g₂ only when measure_cosine is set.
COSINE_OPTIONAL = ("sam", "asam", "vasso", "msam", "noise_resistant_sam", "random_sam",
                   "saner_random_sam", "ae_sam", "esam", "fsam", "late_phase_sam")  # fmt: skip
# The options only some optimizers read: {field: (what it is, does optimizer X read it)}. A
# run must not silently drop an option its user asked for (``--optimizer=sgd --rho=0.1``), so
# setting one the chosen optimizer ignores is an error (:func:`check_ignored_options`).
OPTIMIZER_OPTIONS: dict[str, tuple[str, typing.Callable[[Any], bool]]] = {
    "rho": ("the perturbation radius", lambda c: c.optimizer in SHARPNESS_AWARE),
    "alpha": ("the α of SANER, GSAM and LookSAM", lambda c: c.optimizer in DEFAULT_ALPHA),
    "theta": ("VaSSO's θ", lambda c: c.optimizer in ("vasso", "saner_vasso")),
    "eta": ("ASAM's η", lambda c: c.optimizer in ("asam", "saner_asam")),
    "mu": ("noise-resistant SAM's gain μ", lambda c: c.optimizer == "noise_resistant_sam"),
    "num_microbatches": ("mSAM's m", lambda c: c.optimizer == "msam"),
    "saner_warmup_epochs": ("SANER's α warm-up", lambda c: c.optimizer.startswith("saner")),
    "measure_cosine": (
        "whether to report the cosine between g and g₂ (SANER, GSAM, LookSAM always do)",
        lambda c: c.optimizer in COSINE_OPTIONAL,
    ),
    "perturbation_mode": (
        "how the perturbation ε is taken over devices",
        lambda c: c.optimizer not in ONE_GRADIENT,
    ),
    "momentum": (
        "SGD's momentum (AdamW has none)",
        lambda c: c.optimizer != "adamw" and c.base_optimizer == "sgd",
    ),
    "base_optimizer": (
        "the optimizer after a sharpness-aware transformation",
        lambda c: c.optimizer not in ONE_GRADIENT,
    ),
}

# Fields that do not change the training trajectory: they may differ when a run is resumed.
RUNTIME_FIELDS = (
    "data_dir",
    "workdir",
    "progress",
    "eval_every",
    "checkpoint_every",
    "max_checkpoints",
    "stop_after_epochs",
    "overwrite",
    # The device layout: synced mode computes the same run on any mesh (up to float32 rounding),
    # so a run may resume on another one; the loop refuses a resume whose per-device or grouped
    # mode would take another number of perturbations.
    "num_devices",
    "mesh",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (validated on construction).

    Data:
      dataset: one of ``sharpjax.data.DATASETS``.
      data_dir: TFDS data directory (prepared datasets only; see ``sharpjax.data``).
      noise: training-label noise, ``"none"``, ``"symmetric"`` or ``"asymmetric"``.
      noise_rate: fraction of corrupted training labels, in ``[0, 1)``.
      augment: random crop (4-pixel padding) and horizontal flip; 32x32 images only.

    Model:
      model: one of ``sharpjax.models.MODELS``.
      model_kwargs: extra keyword arguments of ``get_model`` (e.g. ``{"hidden_sizes": [64]}``).
      mixed_precision: compute in bfloat16; params, optimizer state and loss stay float32.

    Optimizer (see :func:`make_optimizer`). An option the chosen optimizer does not read
    (:data:`OPTIMIZER_OPTIONS`) is an error when set: on the command line any option given,
    from Python ``rho``, ``alpha`` and a ``perturbation_mode`` other than synced (a grid over
    optimizers passes its other shared options, at their values, to every run):
      optimizer: one of :data:`OPTIMIZERS`. ``momentum_sam`` is Momentum-SAM
        (:func:`sharpjax.momentum_sam`), which replaces SGD: one gradient per step, at the
        params perturbed by ``-rho`` along the momentum; the trainer holds (and evaluates,
        checkpoints and returns) those perturbed params.
      base_optimizer: ``"sgd"`` or ``"adamw"``, the optimizer after the sharpness-aware
        transformation (``optimizer="adamw"`` implies ``"adamw"``).
      rho: perturbation radius; None: the method's paper default (:data:`DEFAULT_RHO`;
        ``config.json`` records the value used).
      alpha: SANER's multiplier on masked elements, GSAM's α or LookSAM's α; None:
        :data:`DEFAULT_ALPHA`.
      theta: VaSSO's θ (also saner_vasso). eta: ASAM's η (also saner_asam).
      mu: noise-resistant SAM's integral gain.
      measure_cosine: report the cosine between g and g₂ for the methods whose output is g₂
        (SAM, ASAM, VaSSO, mSAM, RST, AE-SAM, ESAM; SANER, GSAM and LookSAM always report
        it); it costs one parameter copy of device memory per step.
      num_microbatches: m of mSAM; must divide ``batch_size``.
      saner_warmup_epochs: SANER's α goes linearly from 1 to ``alpha`` over this many epochs
        (paper: 50 of 200); 0 uses ``alpha`` from the start.
      learning_rate: peak learning rate. momentum: SGD momentum.
      weight_decay: L2 decay, applied by the base optimizer, outside the perturbation.
      lr_schedule: ``"constant"``, ``"cosine"`` (to 0 at the end) or ``"step"`` (x0.1 at 50%
        and 75% of the epochs); all after a linear warm-up of ``warmup_epochs``.
      warmup_epochs: epochs of linear learning-rate warm-up from 0 (0: none).
      epochs: number of epochs. batch_size: examples per step (the global batch, over every
        device and host).
      num_micro_steps: gradient accumulation: each step's batch is split into this many
        micro-steps, whose clean gradients are accumulated before ε is computed once and whose
        second gradients are accumulated at w + ε (full-batch SAM at the activation memory of
        one micro-step); must divide ``batch_size`` (per perturbation micro-batch).

    Devices (see :mod:`sharpjax.parallel`; the step runs under ``jax.jit`` on a mesh of
    ``num_devices`` devices with axes data × fsdp × model, the batch split over data × fsdp):
      num_devices: devices of the mesh; None: every device JAX sees (every host's after
        ``jax.distributed.initialize``). Must divide ``batch_size``.
      mesh: the mesh's axis sizes, e.g. ``"data=2,fsdp=4"``: ``data`` replicas, ``fsdp``
        devices splitting the params, optimizer and rule state (ZeRO-3), ``model`` tensor
        parallel (models with partitioning annotations); unnamed axes have size 1 and the
        product must be the device count. None: every device on ``data`` (params replicated).
      perturbation_mode: ``"synced"`` (default: one ε from the global-batch gradient, so the
        run is the same on any mesh), ``"per_device"`` (one ε per replica's shard, i.e. per
        device when the params are replicated: the original SAM's m-sharpness, mSAM with m =
        the replicas) or ``"grouped"`` (one ε per group of ``group_size`` consecutive
        devices). With ``optimizer="msam"`` each replica or group is further split into
        ``num_microbatches`` micro-batches.
      group_size: devices per group with ``perturbation_mode="grouped"``; must divide the
        device count (and be a whole number of replicas).

    Disturbances (the noise-resistant SAM settings):
      grad_noise_std: std of Gaussian noise added to every gradient evaluation (DP-SGD-like
        noisy gradient oracle: the clean gradient and the second gradient each get their own).
      param_noise_std: std of Gaussian noise added to the params after each step.
      param_bias: constant added to every param after each step (constant disturbance).

    Run:
      seed: seeds the init, batch order, augmentation, dropout and noise (and the label noise).
      eval_every: evaluate every this many epochs (and after the last one).
      checkpoint_every: save a checkpoint every this many epochs (0: never).
      max_checkpoints: checkpoints kept in ``workdir/checkpoints``.
      workdir: where config, metrics, results and checkpoints go; None: nothing written.
      progress: show a tqdm progress bar.
      max_steps_per_epoch: cap on the steps of an epoch (tests, quick runs).
      stop_after_epochs: stop (checkpointed, resumable, no ``result.json``) once this many
        epochs are done, as if the job had been interrupted; the schedule still spans
        ``epochs``.
      overwrite: allow replacing a finished run's results in ``workdir``.

    To resume an interrupted run, run the same config with the same ``workdir`` again: it
    continues from the newest checkpoint (``checkpoint_every > 0``). One trainer at a time
    may use a workdir (a lock file, see :mod:`sharpjax.train.checkpoint`).
    """

    # data
    dataset: str = "mnist1d"
    data_dir: str | None = None
    noise: str = "none"
    noise_rate: float = 0.0
    augment: bool = False
    # model
    model: str = "cnn1d"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    mixed_precision: bool = False
    # optimizer
    optimizer: str = "sgd"
    base_optimizer: str = "sgd"
    rho: float | None = None
    alpha: float | None = None
    theta: float = 0.9
    eta: float = 0.01
    mu: float = 0.01
    measure_cosine: bool = True
    num_microbatches: int = 4
    saner_warmup_epochs: int = 0
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    warmup_epochs: int = 0
    epochs: int = 10
    batch_size: int = 128
    num_micro_steps: int = 1
    # devices
    num_devices: int | None = None
    mesh: str | None = None
    perturbation_mode: str = "synced"
    group_size: int | None = None
    # disturbances
    grad_noise_std: float = 0.0
    param_noise_std: float = 0.0
    param_bias: float = 0.0
    # run
    seed: int = 0
    eval_every: int = 1
    checkpoint_every: int = 0
    max_checkpoints: int = 2
    workdir: str | None = None
    progress: bool = True
    max_steps_per_epoch: int | None = None
    stop_after_epochs: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError listing the fields."""
        _check_known(values)
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def _check_known(values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ValueError(
            f"Unknown TrainConfig field(s) {unknown}. Known fields: {', '.join(field_names())}."
        )


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


def _positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}.")


def _non_negative(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}.")


def _check_types(config: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        allowed = tuple(type(None) if a is None else a for a in allowed)
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            ok = True  # an int is a fine float
        if not ok:
            names = " | ".join(getattr(a, "__name__", str(a)) for a in allowed)
            raise TypeError(f"{f.name} must be {names}, got {value!r} ({type(value).__name__}).")


def _check_devices(config: TrainConfig) -> None:
    """The device fields on their own; the device count itself is checked by the loop."""
    n, g = config.num_devices, config.group_size
    if n is not None and n < 1:
        raise ValueError(f"num_devices must be None (all devices) or >= 1, got {n}.")
    if config.perturbation_mode == "grouped":
        if g is None or g < 1:
            raise ValueError(
                f"perturbation_mode='grouped' needs group_size, a positive divisor of the "
                f"device count, got group_size={g!r}."
            )
        if n is not None and n % g:
            raise ValueError(
                f"group_size={g} does not divide num_devices={n}: choose one of "
                f"{[d for d in range(1, n + 1) if n % d == 0]}."
            )
    elif g is not None:
        raise ValueError(
            f"group_size={g} is only used with perturbation_mode='grouped' "
            f"(perturbation_mode={config.perturbation_mode!r}): remove it or switch the mode."
        )
    if n is not None and config.batch_size % n and config.mesh is None:
        raise ValueError(
            f"batch_size={config.batch_size} is not a multiple of num_devices={n}: use a "
            "batch_size that is, or a num_devices that divides it."
        )
    if config.mesh is not None:
        from sharpjax.parallel import parse_mesh

        shape = parse_mesh(config.mesh, n)  # the axes' names and sizes; the count if known
        shards = shape["data"] * shape["fsdp"]
        if config.batch_size % shards:
            raise ValueError(
                f"batch_size={config.batch_size} is not a multiple of the {shards} batch shards "
                f"of mesh={config.mesh!r} (data × fsdp): use a batch_size that is, or another "
                "mesh."
            )


def _check_model_kwargs(config: TrainConfig) -> None:
    """The keys of ``model_kwargs`` are fields of the model (num_classes comes from the data)."""
    from sharpjax.models import get_model

    module = type(get_model(config.model, 1))
    fields = {f.name for f in dataclasses.fields(module)} - {"parent", "name", "num_classes"}
    unknown = sorted(set(config.model_kwargs) - fields)
    if unknown:
        raise ValueError(
            f"model_kwargs has {unknown}, which model={config.model!r} ({module.__name__}) does "
            f"not take; its options are {sorted(fields)}."
        )


def validate(config: TrainConfig) -> None:
    """Raises a ValueError/TypeError naming the offending field; called on construction.

    Checks that need the data (``batch_size`` against the dataset size, ``augment`` against the
    image size) are done by the loop once the dataset is loaded.
    """
    from sharpjax.data import DATASETS
    from sharpjax.models import MODELS

    _check_types(config)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}.")
    _choice("dataset", config.dataset, DATASETS)
    _choice("model", config.model, MODELS)
    _check_model_kwargs(config)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("base_optimizer", config.base_optimizer, BASE_OPTIMIZERS)
    _choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    _choice("noise", config.noise, NOISE_KINDS)
    _choice("perturbation_mode", config.perturbation_mode, PERTURBATION_MODES)
    _check_devices(config)
    if config.optimizer == "sgd" and config.base_optimizer == "adamw":
        raise ValueError(
            "optimizer='sgd' with base_optimizer='adamw' is contradictory: use optimizer='adamw'."
        )
    if config.optimizer == "momentum_sam" and config.base_optimizer == "adamw":
        raise ValueError(
            "optimizer='momentum_sam' replaces SGD with momentum (it owns the momentum), so it "
            "takes no base_optimizer='adamw': remove base_optimizer, or choose another optimizer."
        )
    # rho and alpha default to None, so a value is the user's; so is a perturbation mode other
    # than synced. The other options have defaults that a Python caller may pass for every
    # optimizer of a grid: they are checked where it is known which were given (the command
    # line, config_from_args).
    given = [name for name in ("rho", "alpha") if getattr(config, name) is not None]
    if config.perturbation_mode != "synced":
        given.append("perturbation_mode")
    check_ignored_options(config, given)
    if not 0.0 <= config.noise_rate < 1.0:
        raise ValueError(f"noise_rate must lie in [0, 1), got {config.noise_rate}.")
    if config.noise == "none" and config.noise_rate != 0.0:
        raise ValueError(
            f"noise_rate={config.noise_rate} needs noise='symmetric' or 'asymmetric' "
            "(noise='none')."
        )
    _positive(config, "learning_rate", "epochs", "batch_size", "eval_every", "max_checkpoints")
    _non_negative(
        config,
        "momentum",
        "weight_decay",
        "warmup_epochs",
        "saner_warmup_epochs",
        "grad_noise_std",
        "param_noise_std",
        "checkpoint_every",
        "mu",
        "eta",
        "seed",
    )
    if config.rho is not None and not config.rho >= 0:
        raise ValueError(f"rho must be >= 0, got {config.rho}.")
    if config.alpha is not None:
        if config.optimizer == "gsam" and not config.alpha >= 0:
            raise ValueError(f"alpha must be >= 0 for gsam, got {config.alpha}.")
        if config.optimizer.startswith("saner") and not 0 < config.alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1] for SANER, got {config.alpha}.")
    if not 0 < config.theta <= 1:
        raise ValueError(f"theta must lie in (0, 1], got {config.theta}.")
    if config.warmup_epochs >= config.epochs and config.warmup_epochs > 0:
        raise ValueError(
            f"warmup_epochs={config.warmup_epochs} must be smaller than epochs={config.epochs}."
        )
    if config.optimizer == "msam" and (
        config.num_microbatches < 1 or config.batch_size % config.num_microbatches
    ):
        raise ValueError(
            f"num_microbatches={config.num_microbatches} must be >= 1 and divide "
            f"batch_size={config.batch_size}."
        )
    if config.num_micro_steps < 1 or config.batch_size % config.num_micro_steps:
        raise ValueError(
            f"num_micro_steps={config.num_micro_steps} must be >= 1 and divide "
            f"batch_size={config.batch_size}."
        )
    for name in ("max_steps_per_epoch", "stop_after_epochs"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be None or >= 1, got {value}.")


# How a message names an option: ``overwrite=True`` for a Python caller, ``--overwrite`` on
# the command line (sharpjax.train.__main__ sets "cli" while it runs).
OPTION_STYLE: contextvars.ContextVar[str] = contextvars.ContextVar("option_style", default="py")


def option(name: str, value: Any = True) -> str:
    """How the caller sets field ``name`` to ``value``, for messages: ``rho=0.1`` (Python) or
    ``--rho=0.1`` (command line; a true flag is just ``--overwrite``)."""
    if OPTION_STYLE.get() != "cli":
        return f"{name}={value!r}"
    if value is True:
        return f"--{name}"
    text = "none" if value is None else json.dumps(value) if isinstance(value, dict) else value
    return f"--{name}={str(text).lower() if isinstance(value, bool) else text}"


# The options that act on a workdir only: without one they would be dropped without a word.
WORKDIR_OPTIONS = ("checkpoint_every", "max_checkpoints", "stop_after_epochs", "overwrite")


def check_ignored_options(config: TrainConfig, given: Sequence[str]) -> None:
    """Raises a ValueError naming each option in ``given`` that ``config.optimizer`` ignores
    (and, for the command line, each workdir option given without a workdir).

    ``given``: the fields the user set (the command line's options; for a Python caller, the
    ones whose default is None). An option left at its default is never an error.
    """
    problems = []
    for name in given:
        if name in WORKDIR_OPTIONS and config.workdir is None and OPTION_STYLE.get() == "cli":
            problems.append(
                f"{option(name, getattr(config, name))} is ignored without "
                f"{option('workdir', 'DIR')}: nothing is saved without one; add a workdir or "
                "remove it"
            )
        if name in OPTIMIZER_OPTIONS and not OPTIMIZER_OPTIONS[name][1](config):
            what, reads = OPTIMIZER_OPTIONS[name]
            users = [
                o
                for o in OPTIMIZERS
                if reads(types.SimpleNamespace(optimizer=o, base_optimizer=config.base_optimizer))
            ]
            others = [o for o in OPTIMIZERS if o not in users]
            readers = ", ".join(users) or "no optimizer with this base_optimizer"
            if len(others) < len(users):
                readers = f"every optimizer but {', '.join(others)}"
            problems.append(
                f"{option(name, getattr(config, name))} is ignored by "
                f"{option('optimizer', config.optimizer)}: {name} is {what}, read by {readers}; "
                "remove it or choose an optimizer that reads it"
            )
    if problems:
        raise ValueError("; ".join(problems) + ".")


def resolved_config(config: TrainConfig, **changes: Any) -> TrainConfig:
    """``config`` with the values its run takes where it leaves them to the method (ρ and α:
    None is the paper's default of the optimizer) and ``changes`` (the loop's device count and
    mesh): what ``config.json`` records. Resuming compares configs this way too."""
    values = with_method_defaults(config.to_dict())
    values.update(changes)
    return TrainConfig(**values)


def with_method_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict with ``rho``/``alpha`` None replaced by the optimizer's default."""
    values = dict(values)
    for name, defaults in (("rho", DEFAULT_RHO), ("alpha", DEFAULT_ALPHA)):
        if values.get(name) is None and values.get("optimizer") in defaults:
            values[name] = defaults[values["optimizer"]]
    return values


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------

CLI_PROG = "python -m sharpjax.train"
CLI_EXAMPLE = f"{CLI_PROG} --dataset=digits --model=mlp --optimizer=sam --epochs=2"


def _plain(text: str) -> str:
    """reStructuredText markup of the docstring as plain text (``x`` → x, :func:`~a.b` → b)."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]*)``", r"\1", text)


def field_help() -> dict[str, tuple[str, str]]:
    """``{field: (section, description)}`` read from :class:`TrainConfig`'s docstring.

    The docstring is the one place the fields are described; ``--help`` shows it in plain
    text. A field described on the line of another (``epochs: ... batch_size: ...``) is found
    too; a field the docstring does not describe is absent.
    """
    names = set(field_names())
    section, current = "", None
    entries: dict[str, list[str]] = {}
    sections: dict[str, str] = {}
    previous_blank = True
    for line in inspect.cleandoc(TrainConfig.__doc__ or "").splitlines()[1:]:
        text = line.strip()
        indent = len(line) - len(line.lstrip())
        match = re.match(r"(\w+): (.*)", text)
        if not text:
            current, previous_blank = None, True
            continue
        if indent == 0 and previous_blank:  # a section heading: "Data:", "Devices (see ...":
            section, current = re.match(r"[^(:]*", text).group().strip(), None
        elif match and match.group(1) in names and indent <= 2:
            current = match.group(1)
            entries[current], sections[current] = [match.group(2)], section
        elif current is not None:
            entries[current].append(text)
        previous_blank = False
    result: dict[str, tuple[str, str]] = {}
    for name, parts in entries.items():
        # "epochs: number of epochs. batch_size: examples per step." holds two fields.
        pieces = re.split(r"(?<=\.)\s+(\w+):\s", " ".join(parts))
        result[name] = (sections[name], _plain(pieces[0]))
        for other, description in zip(pieces[1::2], pieces[2::2], strict=True):
            if other in names:
                result[other] = (sections[name], _plain(description))
            else:  # "word: " inside a description: put it back
                result[name] = (
                    sections[name],
                    f"{result[name][1]} {other}: {_plain(description)}",
                )
    return result


def _type_name(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    name = {bool: "BOOL", int: "INT", float: "FLOAT", dict: "JSON", str: "STR"}.get(base, "VALUE")
    return f"{name}|none" if args else name


class _ArgumentError(ValueError):
    """What argparse would print and exit on: raised instead, as config_from_args promises."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise _ArgumentError(message)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The ``argparse`` parser of :func:`config_from_args`: one option per TrainConfig field.

    Each option's help is the field's description in the class docstring and its default;
    options are grouped as the docstring groups the fields. Values are kept as strings (the
    parser's result maps field names to the text given); :func:`_convert` types them.
    """
    parser = _Parser(
        prog=CLI_PROG,
        description=textwrap.fill(
            "Train a model with a sharpness-aware optimizer. Every TrainConfig field is an "
            "option; values are --key=value or --key value (ints, floats, true/false, none "
            "for optional fields, JSON for dicts: --model_kwargs='{\"hidden_sizes\": [64]}'). "
            "The final epoch's metrics are printed as JSON.",
            width=80,
        ),
        epilog=(
            f"example (offline, under a minute on a CPU):\n  {CLI_EXAMPLE}\n\n"
            + textwrap.fill(
                "To resume an interrupted run, run the same command again with the same "
                "--workdir: it continues from the newest checkpoint (--checkpoint_every=N saves "
                "one every N epochs) and prints where it resumes from. A finished run's results "
                "are kept unless --overwrite. One trainer at a time may use a workdir (the lock "
                "file WORKDIR/.sharpjax.lock names the trainer that holds it).",
                width=80,
            )
            + "\n\n"
            + textwrap.fill(
                "A user error (unknown option, bad value, dataset not prepared, incompatible "
                "workdir) prints one message and exits with status 2; set "
                "SHARPJAX_TRACEBACK=1 to see the traceback.",
                width=80,
            )
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
        allow_abbrev=False,
    )
    from sharpjax.data import DATASETS
    from sharpjax.models import MODELS

    choices = {
        "dataset": DATASETS,
        "model": MODELS,
        "optimizer": OPTIMIZERS,
        "base_optimizer": BASE_OPTIMIZERS,
        "lr_schedule": LR_SCHEDULES,
        "noise": NOISE_KINDS,
        "perturbation_mode": PERTURBATION_MODES,
    }
    docs = field_help()
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        section, description = docs.get(f.name, ("Other", "(not described)"))
        if section not in groups:
            groups[section] = parser.add_argument_group(section.lower() or "options")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "none" if default is None else json.dumps(default)
        if f.name in choices:
            description = f"{description} Choices: {', '.join(choices[f.name])}."
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if hints[f.name] is bool else {}
        groups[section].add_argument(
            *flags,
            dest=f.name,
            metavar=_type_name(hints[f.name]),
            default=argparse.SUPPRESS,  # only the options given change the base config
            help=f"{description} (default: {shown})".replace("%", "%%"),
            **extra,
        )
    return parser


def _convert(name: str, text: str, annotation: Any) -> Any:
    """Parses ``text`` to the type of field ``name`` (``X | None`` accepts ``none``/``null``)."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if text.lower() in ("none", "null"):
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
        return str(text)
    except (ValueError, json.JSONDecodeError):
        kind = "a JSON object" if annotation is dict else getattr(annotation, "__name__", "?")
        raise ValueError(f"--{name}: cannot parse {text!r} as {kind}.") from None


def config_from_args(argv: Sequence[str], base: TrainConfig | None = None) -> TrainConfig:
    """Applies ``--key=value`` / ``--key value`` overrides to ``base`` (default TrainConfig()).

    Values are converted to the field's type: ints, floats, booleans (``true/false/1/0/yes/no``;
    a bare ``--flag`` means true), ``none``/``null`` for optional fields, JSON objects for dict
    fields (``--model_kwargs='{"hidden_sizes": [64]}'``). Dashes in keys may be underscores.
    The options are those of :func:`build_parser`.

    Raises:
      ValueError: an unknown key (the message lists the fields), a value that does not parse,
        or a resulting config that does not validate.
    """
    base = TrainConfig() if base is None else base
    hints = typing.get_type_hints(TrainConfig)
    argv = list(argv)
    seen: set[str] = set()
    for token in argv:
        if token.startswith("--"):
            key = token[2:].partition("=")[0].replace("-", "_")
            # Our message lists the fields, where argparse would only name the stranger.
            _check_known({key: None})
            if key in seen:  # argparse would keep the last one without a word
                raise ValueError(f"--{key} is given more than once: give it once.")
            seen.add(key)
    try:
        parsed = vars(build_parser(add_help=False).parse_args(argv))
    except _ArgumentError as e:
        message = str(e)
        missing = re.match(r"argument (--[\w-]+).*: expected one argument", message)
        if missing:
            message = f"{missing.group(1)} needs a value"
        hint = "Options are --key=value or --key value (see --help)."
        raise ValueError(f"{message}. {hint}") from None
    changes = {key: _convert(key, text, hints[key]) for key, text in parsed.items()}
    config = dataclasses.replace(base, **changes)
    check_ignored_options(config, list(changes))
    return config


# --------------------------------------------------------------------------------------
# Optimizer.
# --------------------------------------------------------------------------------------


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the step: linear warm-up, then the schedule."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    peak = config.learning_rate
    if config.lr_schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
    else:  # step: x0.1 at 50% and 75% of training
        scales: dict[int, float] = {}
        for fraction in (0.5, 0.75):
            boundary = max(int(fraction * total) - warmup, 0)
            scales[boundary] = scales.get(boundary, 1.0) * 0.1
        main = optax.piecewise_constant_schedule(peak, scales)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def perturbation_microbatches(
    config: TrainConfig, num_devices: int, replica_devices: int = 1
) -> int:
    """How many perturbations (ε) one global batch gets: the step's ``num_microbatches``.

    The mode's count (1 synced, the replicas per device, devices/``group_size`` grouped;
    :func:`sharpjax.parallel.perturbation_microbatches`; ``replica_devices``: the devices of
    one replica, fsdp × model) times mSAM's ``num_microbatches``; 1 for the plain base
    optimizers, which take no second gradient.
    """
    from sharpjax.parallel import perturbation_microbatches as per_mode

    if config.optimizer in ONE_GRADIENT:
        return 1
    m = config.num_microbatches if config.optimizer == "msam" else 1
    return per_mode(config.perturbation_mode, num_devices, config.group_size, replica_devices) * m


def make_optimizer(
    config: TrainConfig,
    steps_per_epoch: int,
    *,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
) -> optax.GradientTransformationExtraArgs:
    """The optax chain of a config: sharpness-aware transformation, weight decay, base optimizer.

    * The sharpness-aware transformation comes first, so the weight decay and the base
      optimizer act on its output, outside the perturbation (docs/algorithms.md).
    * ``saner*``: α follows :func:`sharpjax.saner_warmup` when ``saner_warmup_epochs > 0``.
      ``saner_vasso``/``saner_asam`` put SANER on VaSSO's / ASAM's perturbation.
    * ``gsam``: ρ follows the learning-rate schedule, ``ρ_t = ρ · lr_t / lr_peak``, as in the
      paper (with a constant schedule ρ is constant).
    * ``noise_resistant_sam``: the integral feedback acts on the SAM gradient only, before
      the weight decay.
    * Base: ``sgd(schedule, momentum)`` after ``add_decayed_weights(weight_decay)``, or
      ``adamw(schedule, weight_decay=weight_decay)`` (decoupled, lr-scaled decay).
    * ``momentum_sam``: ``add_decayed_weights(weight_decay)`` then
      ``sharpjax.momentum_sam(schedule, momentum, rho)``, which is the base optimizer.

    The result is always an ``optax.GradientTransformationExtraArgs`` (a chain), so the loop
    can pass ``grad_fn`` to any optimizer; the plain ones ignore it. For ``msam`` the
    ``updates`` are the stacked per-micro-batch gradients (see :func:`sharpjax.msam`).

    ``num_microbatches``: the step's perturbation micro-batches
    (:func:`perturbation_microbatches`; default: ``config.num_microbatches`` for ``msam``, else
    1). When it is > 1 the sharpness-aware transformation is built with it, so every method
    has its m-sharpness form (per-device mode on N devices is m = N); ``sam`` then is
    ``sharpjax.msam``, which is SAM with one ε per micro-batch. ``microbatch_execution``:
    how their second passes run (:func:`sharpjax.core.sharpness_aware`); the trainer asks for
    ``"parallel"`` on a mesh of several devices, so that each device runs its own.
    """
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}.")
    schedule = learning_rate_schedule(config, steps_per_epoch)
    name = config.optimizer
    rho = DEFAULT_RHO.get(name, 0.0) if config.rho is None else config.rho
    alpha: Any = DEFAULT_ALPHA.get(name, 0.0) if config.alpha is None else config.alpha
    if name.startswith("saner") and config.saner_warmup_epochs > 0:
        alpha = sharpjax.saner_warmup(alpha, config.saner_warmup_epochs * steps_per_epoch)

    m = num_microbatches
    if m is None:
        m = config.num_microbatches if name == "msam" else 1
    micro: dict[str, Any] = {}
    if m > 1:
        micro = {"num_microbatches": m, "microbatch_execution": microbatch_execution}
    cosine = config.measure_cosine

    if name in ("sgd", "adamw"):
        sharpness = None
    elif name == "sam" and micro:  # SAM with one ε per micro-batch is mSAM
        sharpness = sharpjax.msam(rho, **micro, cosine=cosine)
    elif name == "sam":
        sharpness = sharpjax.sam(rho, cosine=cosine)
    elif name == "asam":
        sharpness = sharpjax.asam(rho, eta=config.eta, **micro, cosine=cosine)
    elif name == "vasso":
        sharpness = sharpjax.vasso(rho, theta=config.theta, **micro, cosine=cosine)
    elif name == "saner":
        sharpness = sharpjax.saner(rho, alpha, **micro)
    elif name == "saner_vasso":
        sharpness = sharpjax.saner(
            rho, alpha, perturbation=sharpjax.vasso_perturbation(config.theta), **micro
        )
    elif name == "saner_asam":
        sharpness = sharpjax.saner(
            rho, alpha, perturbation=sharpjax.adaptive_perturbation(config.eta), **micro
        )
    elif name == "gsam":
        peak = config.learning_rate
        sharpness = sharpjax.gsam(lambda count: rho * schedule(count) / peak, alpha, **micro)
    elif name == "msam":
        sharpness = sharpjax.msam(rho, **micro, cosine=cosine)
    elif name == "noise_resistant_sam":
        sharpness = sharpjax.noise_resistant_sam(rho, mu=config.mu, **micro, cosine=cosine)
    elif name == "looksam":  # alpha: LookSAM's α
        sharpness = sharpjax.looksam(rho, alpha=alpha, **micro)
    elif name == "random_sam":
        sharpness = sharpjax.random_sam(rho, seed=config.seed, **micro, cosine=cosine)
    elif name == "saner_random_sam":
        combination = sharpjax.saner_combination(alpha)
        sharpness = sharpjax.random_sam(
            rho, seed=config.seed, combination=combination, **micro, cosine=cosine
        )
    elif name == "ae_sam":  # the paper's threshold schedule over the whole run
        sharpness = sharpjax.ae_sam(
            rho, total_steps=config.epochs * steps_per_epoch, **micro, cosine=cosine
        )
    elif name == "esam" and micro:
        raise ValueError(
            "optimizer='esam' takes no micro-batches (num_microbatches > 1 or several "
            "perturbations per step); use perturbation_mode='synced' on several devices."
        )
    elif name == "esam":
        sharpness = sharpjax.esam(rho, gamma=1.0, seed=config.seed, cosine=cosine)
    elif name == "fsam":
        sharpness = sharpjax.fsam(rho, **micro, cosine=cosine)
    elif name == "wsam":  # coupled (the objective's gradient), γ = 0.9
        sharpness = sharpjax.wsam(rho, **micro)
    elif name == "late_phase_sam":  # SAM on the last 1/8 of the run (25 of 200 epochs)
        total = config.epochs * steps_per_epoch
        sharpness = sharpjax.late_phase_sam(total, rho, **micro, cosine=cosine)
    elif name in NO_MICROBATCHES and micro:
        raise ValueError(
            f"optimizer={name!r} takes no micro-batches (num_microbatches > 1 or several "
            "perturbations per step); use perturbation_mode='synced' on several devices."
        )
    elif name == "sampa":  # y_{t+1} = w_t − η_t ∇f(y_t) with the base optimizer's schedule
        sharpness = sharpjax.sampa(schedule, rho)
    elif name == "lookbehind_sam":  # the base optimizer steps k = 2 times per step
        k = 2
        fast_schedule = lambda count: schedule(count // k)
        if config.base_optimizer == "adamw":
            fast = optax.adamw(fast_schedule, weight_decay=config.weight_decay)
        else:
            fast = optax.chain(
                optax.add_decayed_weights(config.weight_decay),
                optax.sgd(fast_schedule, momentum=config.momentum or None),
            )
        return optax.chain(sharpjax.lookbehind_sam(fast, rho, k=k, alpha=0.5))
    elif name == "momentum_sam" and micro:
        raise ValueError(
            "optimizer='momentum_sam' takes no micro-batches (one gradient per step, perturbed "
            "along the shared momentum); use perturbation_mode='synced' on several devices."
        )
    elif name == "momentum_sam":  # it is the base optimizer: weight decay before it, at w̃
        decay = optax.add_decayed_weights(config.weight_decay)
        return optax.chain(
            decay, sharpjax.momentum_sam(schedule, momentum=config.momentum, rho=rho)
        )
    else:  # pragma: no cover - validate() rejects it first
        raise ValueError(f"optimizer={name!r} is not one of {OPTIMIZERS}.")

    if name == "adamw" or config.base_optimizer == "adamw":
        base = [optax.adamw(schedule, weight_decay=config.weight_decay)]
    else:
        base = [
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(schedule, momentum=config.momentum or None),
        ]
    return optax.chain(*([sharpness] if sharpness is not None else []), *base)
