"""Efficient sharpness-aware variants: SAM's second gradient on some steps, weights or rows.

Each is an optax transformation built on :func:`sharpjax.core.sharpness_aware` (Momentum-SAM
excepted: it takes no second gradient at all and owns the momentum), and each is also
available as rules, so that other rules compose with it (SANER on RST, SANER on LookSAM)::

    policy                         combination                 perturbation
    every_k_steps(k)               looksam_combination(α)      sam_perturbation()
    random_policy(p, seed)         (any)                       (any)
    adaptive_policy(c, δ)          (any)                       (any)
                                                               stochastic_perturbation(β, seed)

A policy decides before the perturbation whether the step takes the second gradient; the
core skips it under ``lax.cond`` (a skipped step costs one gradient) and reports
``second_gradient`` and ``second_gradient_fraction`` in the diagnostics. Its decision depends
only on ‖g‖² averaged over the data-parallel axis, the step count and its own replicated
state (a PRNG key), so every device takes the same decision.

The decision can also be read outside the step (:func:`plan_second_gradient`) and passed back
as ``tx.update(..., second_gradient=True/False)``, so that a training loop runs one of two
compiled programs instead of the ``lax.cond``. LookSAM's and RST's policies decide from their
state and the step count alone: the decision is known before the step (:func:`planned_step`).
AE-SAM's needs this step's ‖g‖²: compute the clean gradient in one program, read the decision
from it, then run the update with or without the second gradient
(``sharpjax.parallel.make_train_step(..., split=True)``). The trainer does both on CPU. On
XLA:CPU this is what makes a skipped step cost one gradient: XLA:CPU rewrites convolutions into
its fast Eigen form only in a program's entry computation, so the backward convolutions of a
conv net inside a ``lax.cond`` branch (or a while loop) run as naive loops, 17-29x slower
(``experiments/benchmarks/cond.py``).

Sources and equations: the project's ``docs/algorithms.md``; each constructor's docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpjax.core import (
    NORM_EPS,
    CombinationRule,
    PerturbationRule,
    PlannedPolicyState,
    ScalarOrSchedule,
    SecondGradientPolicy,
    SharpnessAwareState,
    check_constant,
    check_scalar_or_schedule,
    compute_dtype,
    evaluate,
    find_states,
    grad_sq_norm,
    sharpness_aware,
    tree_norm,
    tree_vdot,
    use_second_gradient,
)
from sharpjax.perturbations import sam_perturbation

__all__ = [
    "AdaptivePolicyState",
    "LookSamState",
    "MomentumSamState",
    "PlannedPolicyState",
    "adaptive_policy",
    "ae_sam",
    "ae_sam_threshold",
    "esam",
    "every_k_steps",
    "grst_schedule",
    "looksam",
    "looksam_combination",
    "momentum_sam",
    "momentum_sam_weights",
    "plan_second_gradient",
    "planned_step",
    "random_policy",
    "random_sam",
    "stochastic_perturbation",
]


def _check_int(name: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


def _check_seed(seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be a Python int (the policy's PRNG seed), got {seed!r}.")


# --------------------------------------------------------------------------------------
# Policies.
# --------------------------------------------------------------------------------------


def _planned(
    init: Callable[[Any], Any],
    decide: Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any, dict[str, jax.Array]]],
    needs_grad_sq: bool,
    diagnostics: tuple[str, ...] = (),
) -> SecondGradientPolicy:
    """The policy ``decide`` with a state that :func:`plan_second_gradient` can read."""

    def ahead(state, count, sq):
        return decide(sq, state, count)[0]

    def wrap(state):
        return PlannedPolicyState(state, ahead, needs_grad_sq)

    def planned_decide(sq, planned, count):
        take, state, diag = decide(sq, planned.state, count)
        return take, dataclasses.replace(planned, state=state), diag

    return SecondGradientPolicy(lambda params: wrap(init(params)), planned_decide, diagnostics)


def every_k_steps(k: int) -> SecondGradientPolicy:
    """Takes the second gradient on steps 0, k, 2k, ... (LookSAM's schedule). k = 1: always.

    The decision is known before the step (:func:`plan_second_gradient`).
    """
    _check_int("k", k)

    def decide(sq, state, count):
        del sq
        return jnp.asarray(count) % k == 0, state, {}

    return _planned(lambda params: (), decide, needs_grad_sq=False)


def random_policy(probability: ScalarOrSchedule, seed: int = 0) -> SecondGradientPolicy:
    """RST's policy: the second gradient with probability ``p_t`` (a float or a schedule).

    The PRNG key lives in the state (replicated, so every device draws the same number); step
    t draws from ``fold_in(key, t)``, so the decision is known before the step
    (:func:`plan_second_gradient`).
    ``p_t`` is clamped into [0, 1]; p = 1 always takes it, p = 0 never. Reports
    ``probability`` (the ``p_t`` used).
    """
    check_scalar_or_schedule("probability", probability, 0.0, 1.0)
    _check_seed(seed)

    def decide(sq, raw, count):
        del sq
        p = evaluate(probability, count, 0.0, 1.0)
        # One draw per step from (key, count): a chain of splits from key(0) happens to start
        # with a dozen draws below 0.5, which made RST at its default seed plain SAM early on.
        draw = jax.random.fold_in(jax.random.wrap_key_data(raw), count)
        # uniform is in [0, 1): p = 1 always takes, p = 0 never.
        return jax.random.uniform(draw, (), p.dtype) < p, raw, {"probability": p}

    return _planned(_raw_key(seed), decide, needs_grad_sq=False, diagnostics=("probability",))


def plan_second_gradient(opt_state: Any, grads: Any = None) -> jax.Array | None:
    """The step's second-gradient decision, read from an optimizer state before ``tx.update``.

    ``opt_state`` is the state of a (chained) transformation holding one sharpjax
    transformation whose policy can be planned (:class:`PlannedPolicyState`); the result is
    the boolean that the policy will decide at the state's step count, to be passed back as
    ``tx.update(g, opt_state, params, ..., second_gradient=bool(plan))``.

    LookSAM's and RST's policies decide from the state alone: ``grads`` is not needed, and the
    decision is known before the step. AE-SAM's needs this step's ‖g‖²: pass ``grads``, the
    clean gradient that ``tx.update`` will get (stacked over the micro-batches for a
    transformation built with ``num_microbatches``); without them the result is None. None also
    when there is no plannable policy, or several (one ``second_gradient`` cannot serve two).
    Works under ``jax.jit`` on one device and under GSPMD (the gradient a global mean); not
    inside ``pmap``/``shard_map``, where the policy averages ‖g‖² over the devices itself. For
    a state whose leaves carry a leading device axis (``jax.pmap``), pass the first device's
    copy.
    """
    found = [
        node
        for node in find_states(opt_state, lambda n: isinstance(n, SharpnessAwareState))
        if isinstance(node.policy_state, PlannedPolicyState)
    ]
    if len(found) != 1:
        return None
    planned, count = found[0].policy_state, found[0].count
    sq = None
    if planned.needs_grad_sq:
        if grads is None:
            return None
        m = planned.num_microbatches
        if m is not None:
            for leaf in jax.tree.leaves(grads):
                if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != m:
                    raise ValueError(
                        f"plan_second_gradient: the transformation was built with "
                        f"num_microbatches={m}, so grads must be the m clean gradients stacked "
                        f"on axis 0 (as tx.update gets them); got a leaf of shape "
                        f"{jnp.shape(leaf)}."
                    )
        sq = grad_sq_norm(grads, micro=m is not None)
    return jnp.asarray(planned.ahead(planned.state, count, sq), jnp.bool_)


_plan = jax.jit(plan_second_gradient)


def planned_step(
    make_step: Callable[[bool | None], Callable], opt_state_of: Callable[..., Any]
) -> Callable:
    """A training step that takes or skips the second gradient in two compiled programs.

    ``make_step(second_gradient)`` builds the jitted step whose ``tx.update`` gets
    ``second_gradient=second_gradient`` (None: the policy decides in the step, under
    ``lax.cond``); ``opt_state_of(*args)`` finds the optimizer state in the step's
    arguments. Each call reads the decision with :func:`plan_second_gradient` on the host
    (which waits for the previous step) and runs the program that takes ``g₂`` or the one that
    does not; without a policy that decides ahead it runs ``make_step(None)``. Each program
    is built on first use.

    Why: XLA:CPU rewrites convolutions into its fast (Eigen) form only in the entry
    computation, so a conv gradient inside ``lax.cond`` (or a while loop) runs as a naive loop,
    many times slower (``experiments/benchmarks/cond.py``). Outside the CPU the ``lax.cond`` step is
    as fast, and saves the host wait and a second compilation.
    """
    steps: dict[bool | None, Callable] = {}

    def step(*args, **kwargs):
        plan = _plan(opt_state_of(*args, **kwargs))
        decision = None if plan is None else bool(plan)
        if decision not in steps:
            steps[decision] = make_step(decision)
        return steps[decision](*args, **kwargs)

    return step


def _raw_key(seed: int) -> Callable[[Any], jax.Array]:
    # States hold raw key data (uint32), which every optax utility and checkpoint handles.
    return lambda params: jax.random.key_data(jax.random.key(seed))


def grst_schedule(total_steps: int, start: float = 0.0, end: float = 1.0) -> optax.Schedule:
    """G-RST's growing probability (Zhao et al. 2022): linear from ``start`` to ``end``.

    ``p_t = start + (end − start) · min(t / total_steps, 1)``; the defaults (0 → 1) make half
    the steps of the run take the second gradient, more of them late in training.
    """
    _check_int("total_steps", total_steps)
    check_scalar_or_schedule("start", start, 0.0, 1.0)
    check_scalar_or_schedule("end", end, 0.0, 1.0)
    return optax.linear_schedule(start, end, total_steps)


class AdaptivePolicyState(NamedTuple):
    """AE-SAM's moving mean and variance of ‖g‖², and whether they have seen a step."""

    mean: jax.Array
    var: jax.Array
    started: jax.Array


def ae_sam_threshold(
    target_fraction: float = 0.5, total_steps: int | None = None, spread: float = 1.0
) -> ScalarOrSchedule:
    """AE-SAM's threshold ``c_t`` so that about ``target_fraction`` of the steps use SAM.

    If ‖g‖² is normal with the tracked mean μ and deviation σ, ``P(‖g‖² ≥ μ + c σ) = 1 − Φ(c)``,
    so ``c₀ = Φ⁻¹(1 − target_fraction)``. With ``total_steps`` the threshold decreases
    linearly from ``c₀ + spread`` to ``c₀ − spread`` over the run (the paper's schedule, which
    with its λ₁ = −1, λ₂ = 1 is target 0.5 and spread 1: fewer SAM steps early, more late);
    without it, ``c₀`` is constant.
    """
    check_scalar_or_schedule("target_fraction", target_fraction, 0.0, 1.0, open_low=True)
    if not target_fraction < 1.0:
        raise ValueError(
            "target_fraction must be < 1 (1 is SAM on every step: pass c=-inf or use sam)."
        )
    check_scalar_or_schedule("spread", spread, 0.0)
    c0 = float(jax.scipy.stats.norm.ppf(1.0 - target_fraction))
    if total_steps is None:
        return c0
    _check_int("total_steps", total_steps)
    return optax.linear_schedule(c0 + spread, c0 - spread, total_steps)


def adaptive_policy(c: ScalarOrSchedule = 0.0, delta: float = 0.9) -> SecondGradientPolicy:
    """AE-SAM's policy (Jiang et al., ICLR 2023): SAM where ‖g‖² is large for the run so far.

    With ``x_t = ‖g_t‖²``: ``μ_t = δ μ_{t−1} + (1 − δ) x_t``,
    ``σ²_t = δ σ²_{t−1} + (1 − δ)(x_t − μ_t)²`` (``μ_0 = x_0``, ``σ_0 = 0``), and the step takes
    the second gradient when ``x_t ≥ μ_t + c_t σ_t``. ``c`` is a float or a schedule
    (:func:`ae_sam_threshold`); c = −∞ always takes it (SAM), c = +∞ never (the base optimizer).
    Reports ``threshold`` (``c_t``) and ``grad_sq_zscore`` ((x − μ)/σ). The decision can be
    read from the clean gradient before ``tx.update`` (:func:`plan_second_gradient` with
    ``grads``).
    """
    # ±∞ are the documented reductions (SAM, the base optimizer); anything else is finite.
    if callable(c) or not (isinstance(c, float | int) and math.isinf(c)):
        check_scalar_or_schedule("c", c, -float("inf"))
    check_scalar_or_schedule("delta", delta, 0.0, 1.0)

    def init(params):
        del params
        # Distinct arrays: a state sharing one buffer twice cannot be donated to a jitted step.
        zeros = jnp.zeros([2], jnp.float32)
        return AdaptivePolicyState(zeros[0], zeros[1], jnp.zeros([], jnp.bool_))

    def decide(x, state, count):
        x = x.astype(jnp.float32)
        mean = jnp.where(state.started, delta * state.mean + (1.0 - delta) * x, x)
        var = jnp.where(state.started, delta * state.var + (1.0 - delta) * (x - mean) ** 2, 0.0)
        std = jnp.sqrt(var)
        c_t = jnp.asarray(c(count) if callable(c) else c, jnp.float32)
        # Written out so that ±∞ hold even where σ = 0 (∞ · 0 would be NaN).
        take = jnp.where(
            c_t == -jnp.inf, True, jnp.where(c_t == jnp.inf, False, x >= mean + c_t * std)
        )
        zscore = (x - mean) / (std + NORM_EPS)
        new = AdaptivePolicyState(mean, var, jnp.ones([], jnp.bool_))
        return take, new, {"threshold": c_t, "grad_sq_zscore": zscore}

    return _planned(init, decide, needs_grad_sq=True, diagnostics=("threshold", "grad_sq_zscore"))


# --------------------------------------------------------------------------------------
# LookSAM's combination.
# --------------------------------------------------------------------------------------


class LookSamState(NamedTuple):
    """LookSAM's ``g_v`` (the part of the last SAM gradient orthogonal to g) and the inner
    combination rule's state."""

    g_v: Any
    inner: Any


def looksam_combination(
    alpha: ScalarOrSchedule = 0.7, inner: CombinationRule | None = None
) -> CombinationRule:
    """LookSAM (Liu et al., CVPR 2022): reuse the SAM gradient's orthogonal part between steps.

    On a step that takes ``g₂``: ``g_s = inner(g, g₂)`` (default ``g₂``; SANER on LookSAM is
    ``inner=saner_combination(0.5)``), output ``g_s``, and keep
    ``g_v = g_s − (g_s·ĝ) ĝ`` with ``ĝ = g/‖g‖``. On a skipped step: output
    ``g + α (‖g‖/‖g_v‖) g_v`` (``g`` before any step took ``g₂``). Reports ``g_v_norm``.
    """
    inner = inner or use_second_gradient()
    check_scalar_or_schedule("alpha", alpha, 0.0)

    def init(params):
        g_v = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), compute_dtype(w)), params)
        return LookSamState(g_v=g_v, inner=inner.init(params))

    def combine(g, g2, state, count):
        g_s, inner_state, diag = inner.combine(g, g2, state.inner, count)
        g_norm = tree_norm(g)
        along = tree_vdot(g_s, g) / (g_norm * g_norm + NORM_EPS)
        g_v = jax.tree.map(
            lambda s, x, v: s.astype(v.dtype) - along * x.astype(v.dtype), g_s, g, state.g_v
        )
        return g_s, LookSamState(g_v, inner_state), {**diag, "g_v_norm": tree_norm(g_v)}

    def skip(g, state, count):
        alpha_t = evaluate(alpha, count, 0.0)
        g_v_norm = tree_norm(state.g_v)
        scale = alpha_t * tree_norm(g) / (g_v_norm + NORM_EPS)
        out = jax.tree.map(
            lambda x, v: (x.astype(v.dtype) + scale * v).astype(x.dtype), g, state.g_v
        )
        # The inner rule reports on skipped steps what its own skip reports; the core carries
        # the last measured value of every key a skip leaves out.
        _, inner_state, diag = inner.skip(g, state.inner, count)
        return out, LookSamState(state.g_v, inner_state), {**diag, "g_v_norm": g_v_norm}

    return CombinationRule(init, combine, (*inner.diagnostics, "g_v_norm"), skip)


# --------------------------------------------------------------------------------------
# ESAM's stochastic weight perturbation.
# --------------------------------------------------------------------------------------


def stochastic_perturbation(beta: float = 0.6, seed: int = 0) -> PerturbationRule:
    """ESAM's stochastic weight perturbation (Du et al., ICLR 2022).

    ``ε = (m ⊙ ρ g/‖g‖) / β`` with ``m`` an elementwise Bernoulli(β) mask drawn afresh each
    step, so that E[ε] is SAM's ε. β = 1 is SAM. The key is in the rule's state (each
    device, and each micro-batch, draws from the same key). β is a constant (not a schedule);
    a traced β (``optax.inject_hyperparams``) is clamped into (0, 1] at run time.
    """
    check_constant("beta", beta)
    check_scalar_or_schedule("beta", beta, 0.0, 1.0, open_low=True)
    _check_seed(seed)

    def perturb(g, params, raw, rho):
        del params
        key, draw = jax.random.split(jax.random.wrap_key_data(raw))
        leaves, treedef = jax.tree.flatten(g)
        keys = jax.random.split(draw, max(len(leaves), 1))
        beta_t = jnp.clip(beta, jnp.finfo(jnp.float32).tiny, 1.0)
        factor = rho / (tree_norm(g) + NORM_EPS) / beta_t

        def leaf(x, k):
            keep = jax.random.uniform(k, jnp.shape(x)) < beta_t
            y = x.astype(compute_dtype(x))
            return jnp.where(keep, factor * y, 0.0).astype(x.dtype)

        eps = jax.tree.unflatten(treedef, [leaf(x, k) for x, k in zip(leaves, keys, strict=False)])
        return eps, jax.random.key_data(key), {}

    return PerturbationRule(_raw_key(seed), perturb)


# --------------------------------------------------------------------------------------
# Constructors.
# --------------------------------------------------------------------------------------


def looksam(
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: ScalarOrSchedule = 0.7,
    *,
    inner: CombinationRule | None = None,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware
    Minimization").

    Every ``k`` steps (steps 0, k, 2k, ...) the SAM gradient ``g_s = ∇L(w + ρ g/‖g‖)``, and
    ``g_v = g_s − (g_s·ĝ) ĝ`` is kept; on the other steps the output is
    ``g + α (‖g‖/‖g_v‖) g_v`` with one gradient. Defaults ρ = 0.05, k = 5, α = 0.7 (the
    paper's). k = 1 is SAM. ``inner`` applies another combination rule to the SAM steps
    (SANER on LookSAM: ``inner=sharpjax.saner_combination(0.5)``).
    """
    return sharpness_aware(
        sam_perturbation(),
        looksam_combination(alpha, inner),
        rho=rho,
        policy=every_k_steps(k),
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
    )


def random_sam(
    rho: ScalarOrSchedule = 0.05,
    probability: ScalarOrSchedule = 0.5,
    *,
    seed: int = 0,
    combination: CombinationRule | None = None,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """RST, randomized sharpness-aware training (Zhao, Zhang, Hu 2022, "Randomized
    Sharpness-Aware Training for Boosting Computational Efficiency in Deep Learning").

    Each step takes the SAM gradient ``∇L(w + ρ g/‖g‖)`` with probability ``p_t``, the clean
    gradient otherwise (a Bernoulli draw from a key in the state, seeded by ``seed``).
    ``probability`` is a float or a schedule: :func:`grst_schedule` is the paper's G-RST.
    Defaults ρ = 0.05, p = 0.5 (the paper's constant-p setting). p = 1 is SAM, p = 0 the base
    optimizer. ``combination`` replaces SAM's on the SAM steps (SANER on RST).
    """
    return sharpness_aware(
        sam_perturbation(),
        combination,
        rho=rho,
        policy=random_policy(probability, seed),
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
        cosine=cosine or None,  # False: still measured where it is free
    )


def ae_sam(
    rho: ScalarOrSchedule = 0.05,
    c: ScalarOrSchedule | None = None,
    *,
    target_fraction: float = 0.5,
    total_steps: int | None = None,
    delta: float = 0.9,
    combination: CombinationRule | None = None,
    num_microbatches: int | None = None,
    microbatch_execution: str = "sequential",
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AE-SAM (Jiang, Yang, Zhang, Kwok, ICLR 2023, "An Adaptive Policy to Employ
    Sharpness-Aware Minimization").

    EMAs of the mean μ and variance σ² of ``x = ‖g‖²`` (rate δ = 0.9); the step takes the SAM
    gradient when ``x ≥ μ + c_t σ`` and the clean one otherwise (see :func:`adaptive_policy`).
    ``c`` defaults to :func:`ae_sam_threshold` ``(target_fraction, total_steps)``: for
    a normal ‖g‖², about ``target_fraction`` (default 0.5) of the steps take SAM; with
    ``total_steps`` the paper's linear schedule (fewer SAM steps early, more late). c = −∞ is
    SAM, c = +∞ the base optimizer. ``combination`` replaces SAM's on the SAM steps.
    """
    if c is None:
        c = ae_sam_threshold(target_fraction, total_steps)
    return sharpness_aware(
        sam_perturbation(),
        combination,
        rho=rho,
        policy=adaptive_policy(c, delta),
        num_microbatches=num_microbatches,
        microbatch_execution=microbatch_execution,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
        cosine=cosine or None,  # False: still measured where it is free
    )


_ESAM_CALL = (
    "ESAM's data selection needs per-example losses: pass\n"
    "    example_loss_fn = lambda p, indices=None: per_example_loss(p, x, y) if indices is None\n"
    "                      else per_example_loss(p, x[indices], y[indices])\n"
    "    updates, state = tx.update(grads, state, params, example_loss_fn=example_loss_fn,\n"
    "                               example_losses=clean_per_example_losses)  # optional"
)


def _check_example_loss_fn(fn: Callable) -> None:
    """Raises a TypeError when ``fn`` cannot be called as ``fn(params)`` and ``fn(params, idx)``."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins): let the call tell
        return
    for args in ((None,), (None, None)):
        try:
            signature.bind(*args)
        except TypeError as err:
            raise TypeError(
                f"example_loss_fn{signature} cannot be called with {len(args)} positional "
                f"argument(s) ({err}): ESAM calls example_loss_fn(params) for the whole batch "
                f"and example_loss_fn(params, indices) for the selected rows. {_ESAM_CALL}"
            ) from None


def esam(
    rho: ScalarOrSchedule = 0.05,
    beta: float = 0.6,
    gamma: float = 0.5,
    *,
    seed: int = 0,
    combination: CombinationRule | None = None,
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """ESAM (Du et al., ICLR 2022, "Efficient Sharpness-aware Minimization for Improved
    Training of Neural Networks").

    * Stochastic weight perturbation: ``ε = (m ⊙ ρ g/‖g‖)/β``, m elementwise Bernoulli(β)
      (:func:`stochastic_perturbation`).
    * Sharpness-sensitive data selection: the per-example losses at ``w + ε`` (a forward
      pass) minus those at ``w``; the second gradient is taken on the ``⌈γB⌉`` rows where the
      loss rises most (a static number of gathered rows, so the backward pass is smaller).

    Defaults ρ = 0.05, β = 0.6, γ = 0.5 (the paper's CIFAR values). β = γ = 1 is SAM.

    ``update`` extra arguments (a superset of the core's): ``example_loss_fn(params,
    indices=None)`` returning the per-example losses of the batch (of the rows ``indices``,
    an int32 array, when given), and optionally ``example_losses``, the clean per-example
    losses the training step already has (recomputed with a forward pass when absent). With
    γ = 1, ``grad_fn``/``value_and_grad_fn`` work as for :func:`sharpjax.sam` instead (one or
    the other: both is an error). The diagnostics' ``perturbed_loss`` is the batch mean at
    ``w + ε`` and ``loss`` the clean mean. Not with ``num_microbatches`` (the selection is over
    the whole batch). β and γ are constants, not schedules; γ fixes how many rows the second
    gradient sees (a static shape), so it must be a concrete number.
    """
    check_constant("gamma", gamma)
    check_scalar_or_schedule("gamma", gamma, 0.0, 1.0, open_low=True)
    try:
        gamma = float(gamma)
    except TypeError as err:  # a tracer: optax.inject_hyperparams without static_args
        raise TypeError(
            "esam's gamma must be a concrete number: it fixes how many rows the second "
            "gradient sees, a static shape (under optax.inject_hyperparams pass "
            "static_args=('gamma',))."
        ) from err
    inner = sharpness_aware(
        stochastic_perturbation(beta, seed),
        combination,
        rho=rho,
        axis_name=axis_name,
        perturbation_mode=perturbation_mode,
        group_size=group_size,
        cosine=cosine or None,  # False: still measured where it is free
    )

    def update_fn(
        updates,
        state,
        params=None,
        *,
        example_loss_fn=None,
        example_losses=None,
        loss=None,
        **extra,
    ):
        if example_loss_fn is None:
            if gamma < 1.0:
                raise TypeError(f"esam(gamma={gamma}) needs example_loss_fn. {_ESAM_CALL}")
            return inner.update(updates, state, params, loss=loss, **extra)
        if not callable(example_loss_fn):
            raise TypeError(f"example_loss_fn must be callable. {_ESAM_CALL}")
        given = [name for name in ("grad_fn", "value_and_grad_fn") if name in extra]
        if given:
            raise TypeError(
                f"esam got both example_loss_fn and {given[0]}: the second gradient comes from "
                f"example_loss_fn (on the selected rows), so {given[0]} would be ignored. Pass "
                f"only example_loss_fn (with gamma = 1, {given[0]} alone also works)."
            )
        if gamma < 1.0:
            _check_example_loss_fn(example_loss_fn)

        def mean_loss(p, indices=None):
            losses = example_loss_fn(p) if indices is None else example_loss_fn(p, indices)
            return jnp.mean(losses.astype(jnp.float32))

        clean = None
        if gamma < 1.0:
            clean = example_loss_fn(params) if example_losses is None else example_losses
            clean = jax.lax.stop_gradient(jnp.asarray(clean, jnp.float32))
            if clean.ndim != 1:
                raise ValueError(
                    f"example_losses (or example_loss_fn(params)) must be a vector of "
                    f"per-example losses, got shape {clean.shape}. {_ESAM_CALL}"
                )
        if loss is None and clean is not None:
            loss = jnp.mean(clean)

        def value_and_grad_fn(perturbed):
            if gamma == 1.0:
                return jax.value_and_grad(mean_loss)(perturbed)
            rows = clean.shape[0]
            selected = math.ceil(gamma * rows)
            at_perturbed = jax.lax.stop_gradient(example_loss_fn(perturbed)).astype(jnp.float32)
            if at_perturbed.shape != clean.shape:
                raise ValueError(
                    f"example_loss_fn gave {at_perturbed.shape} losses at w + ε but "
                    f"{clean.shape} clean ones; both must be the batch's per-example losses."
                )
            _, indices = jax.lax.top_k(at_perturbed - clean, selected)
            grads = jax.grad(mean_loss)(perturbed, indices.astype(jnp.int32))
            return jnp.mean(at_perturbed), grads

        return inner.update(
            updates, state, params, value_and_grad_fn=value_and_grad_fn, loss=loss, **extra
        )

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


# --------------------------------------------------------------------------------------
# Momentum-SAM.
# --------------------------------------------------------------------------------------


class MomentumSamState(NamedTuple):
    """Momentum-SAM's state: the step count, the momentum ``v``, the ρ by which the params
    the loop holds are offset from the true weights (read by :func:`momentum_sam_weights`),
    and the last diagnostics."""

    count: jax.Array
    velocity: Any
    rho: jax.Array
    diagnostics: dict[str, jax.Array]


def momentum_sam(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    rho: ScalarOrSchedule = 0.3,
) -> optax.GradientTransformation:
    """Momentum-SAM (Becker, Altrock, Risse 2023, "Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead"): one gradient per step, at the point perturbed against
    the momentum.

    It replaces ``optax.sgd(learning_rate, momentum)`` (not a stage before it: it owns the
    momentum). With ``w_t`` the true weights and ``v`` the momentum::

        g_t     = ∇L(w_t − ρ v_t/‖v_t‖)     (v_0 = 0: plain SGD at step 0)
        v_{t+1} = μ v_t + g_t
        w_{t+1} = w_t − η_t v_{t+1}

    As in the paper's code, the params the training loop holds are the perturbed weights
    ``w̃_t = w_t − ρ v̂_t``, so the ordinary training step (one gradient at the params) gives
    ``g_t``, and the update moves ``w̃_t`` to ``w̃_{t+1}``. Evaluate at the true weights,
    :func:`momentum_sam_weights` ``(params, opt_state)``. Weight decay chains before it
    (``optax.chain(optax.add_decayed_weights(wd), momentum_sam(lr))``) and is then taken at
    ``w̃``. Defaults μ = 0.9, ρ = 0.3 (the paper's ρ for ResNets on CIFAR with SGD is of order
    0.3 to 3, larger than SAM's since −v̂ is a weaker ascent direction). ρ = 0 is SGD with
    momentum. ``learning_rate``, ``momentum`` and ``rho`` may be floats, schedules or traced
    values (``optax.inject_hyperparams``); a traced value outside its range is clamped into it
    (μ into [0, 1], η and ρ to ≥ 0). Reports ``grad_norm``, ``velocity_norm`` and the ``rho``
    and ``momentum`` used.
    """
    check_scalar_or_schedule("learning_rate", learning_rate, 0.0)
    check_scalar_or_schedule("momentum", momentum, 0.0, 1.0)
    check_scalar_or_schedule("rho", rho, 0.0)

    def init_fn(params):
        velocity = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), compute_dtype(w)), params)
        names = ("grad_norm", "velocity_norm", "rho", "momentum")
        return MomentumSamState(
            jnp.zeros([], jnp.int32),
            velocity,
            jnp.zeros([], jnp.float32),
            {n: jnp.zeros([], jnp.float32) for n in names},
        )

    def update_fn(updates, state, params=None):
        del params
        count = state.count
        lr = evaluate(learning_rate, count, 0.0)
        rho_now = evaluate(rho, count, 0.0)
        rho_next = evaluate(rho, optax.safe_increment(count), 0.0)
        mu = evaluate(momentum, count, 0.0, 1.0)
        old = state.velocity
        new = jax.tree.map(lambda v, g: (mu * v + g).astype(v.dtype), old, updates)
        old_norm, new_norm = tree_norm(old), tree_norm(new)
        # w̃_{t+1} − w̃_t = ρ v̂_t − η v_{t+1} − ρ' v̂_{t+1}
        back = rho_now / (old_norm + NORM_EPS)
        ahead = rho_next / (new_norm + NORM_EPS)
        out = jax.tree.map(
            lambda v0, v1, g: (back * v0 - lr * v1 - ahead * v1).astype(g.dtype), old, new, updates
        )
        diag = {
            "grad_norm": tree_norm(updates),
            "velocity_norm": new_norm,
            "rho": rho_next,
            "momentum": mu,
        }
        diag = {k: jnp.asarray(v, jnp.float32) for k, v in diag.items()}
        # The ρ of the params the loop will hold (w̃_{t+1} = w_{t+1} − ρ_{t+1} v̂_{t+1}).
        held_rho = jnp.asarray(rho_next, jnp.float32)
        fresh = MomentumSamState(optax.safe_increment(count), new, held_rho, diag)
        finite = jnp.isfinite(new_norm)
        # A non-finite gradient leaves the momentum as it was (the output carries it on).
        kept = jax.tree.map(
            lambda n, o: jnp.where(finite, n, o), fresh, state._replace(diagnostics=diag)
        )
        return out, kept

    return optax.GradientTransformation(init_fn, update_fn)


def momentum_sam_weights(params: Any, opt_state: Any) -> Any:
    """The true weights ``w_t = w̃_t + ρ_t v̂_t`` from the params a Momentum-SAM loop holds.

    ``opt_state`` is the optimizer's state (a chain is searched for the
    :class:`MomentumSamState`); ``ρ_t`` is read from it (the value :func:`momentum_sam` used
    for these params, schedules and injected values included), so it cannot disagree with
    the optimizer's.
    """
    found = find_states(opt_state, lambda node: isinstance(node, MomentumSamState))
    if len(found) != 1:
        raise ValueError(
            f"momentum_sam_weights needs the state of exactly one momentum_sam in opt_state, "
            f"found {len(found)}."
        )
    state = found[0]
    scale = state.rho / (tree_norm(state.velocity) + NORM_EPS)
    return jax.tree.map(
        lambda w, v: (w.astype(v.dtype) + scale * v).astype(w.dtype), params, state.velocity
    )
