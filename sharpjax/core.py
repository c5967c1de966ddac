"""The one two-gradient mechanism behind every SAM-like method of sharpjax.

Every sharpness-aware step takes two gradients: the clean gradient ``g`` at ``w``, which the
training step already has and passes in as ``updates``, and ``g₂ = ∇L(w + ε)`` at a perturbed
point. :func:`sharpness_aware` implements this once, as an
``optax.GradientTransformationExtraArgs``::

    take            = policy.decide(‖g‖², policy_state, count)   # efficient variants only
    ε, rule_state   = perturbation.perturb(g, params, rule_state, rho_t)
    g₂              = grad_fn(params + ε)                          # the only second pass
    out, rule_state = combination.combine(g, g₂, rule_state, count)
    (if not take:     out, rule_state = combination.skip(g, rule_state, count), no g₂ at all)

``out`` goes to the next transformation of an ``optax.chain``, so the base optimizer steps
from ``w``, never from ``w + ε``. A variant is a :class:`PerturbationRule`, a
:class:`CombinationRule`, a :class:`SecondGradientPolicy`, or a mix (see ``perturbations.py``,
``combinations.py`` and ``efficient.py``). The equations and their sources are in the
project's ``docs/algorithms.md``.

Three ways to split the batch, one mechanism:

* data parallelism: with ``axis_name`` set, the final gradient is always averaged over that
  axis; the perturbation is computed from each device's own gradient (``"per_device"``,
  Foret et al.'s m-sharpness), from the gradient averaged over all devices (``"synced"``), or
  averaged within consecutive groups of ``group_size`` devices;
* m-sharpness on one device (``num_microbatches=m``): the per-device mode over a micro-batch
  axis. Each micro-batch has its own ε (and its own rule state, e.g. VaSSO's ``d``), every rule
  composes with it, and the output is the mean over micro-batches;
* both at once: ``m`` micro-batches on each device of ``axis_name`` (per-device mode).

Reliability: a step whose clean or second gradient is not finite leaves every rule state (and
the step count) as it was. A non-finite clean gradient ``g`` is passed on in the output, so
that ``optax.apply_if_finite`` around the chain (which checks its input) skips the step. A
non-finite ``ε`` or ``g₂`` from a finite ``g`` (the loss overflows at ``w + ε``, an injected
ρ is NaN) is invisible to ``apply_if_finite``: the output of that step is zero instead, so the
params stay finite with or without it, and the diagnostics count such steps in
``nonfinite_second_gradients`` (the base optimizer still sees the zero: SGD's momentum keeps
moving, Adam's moments decay). ``optax.MultiSteps`` is refused (it would take ``g₂`` on its
last mini-batch alone): accumulate with ``sharpjax.parallel``'s ``num_micro_steps``.
Hyperparameters may be floats, optax schedules, or traced values (for
``optax.inject_hyperparams``); a value outside its range at run time is clamped into it, and
the value used is reported in the diagnostics (``rho``, SANER's ``alpha``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = float | jax.Array | Schedule

# Added to norms before dividing, so that a zero gradient gives a zero perturbation.
NORM_EPS = 1e-12

PERTURBATION_MODES = ("per_device", "synced", "grouped")
MICROBATCH_EXECUTIONS = ("sequential", "parallel")

# The name of the micro-batch axis of m-sharpness (a vmap axis inside the update).
MICROBATCH_AXIS = "sharpjax_microbatch"

_CALL_PATTERN = (
    "Pass the gradient function as an extra argument of update:\n"
    "    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)\n"
    "    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)\n"
    "or, to have the perturbed loss in the diagnostics,\n"
    "    value_and_grad_fn = lambda p: jax.value_and_grad(loss_fn)(p, batch)\n"
    "    updates, state = tx.update(grads, state, params, value_and_grad_fn=value_and_grad_fn,\n"
    "                               loss=clean_loss)"
)


# --------------------------------------------------------------------------------------
# Small pytree helpers shared by the rules. Arithmetic runs in the params' precision, and at
# least float32 (bfloat16 params are accumulated in float32, float64 params in float64).
# --------------------------------------------------------------------------------------


def compute_dtype(x: Any) -> jnp.dtype:
    """The dtype the rules compute in for a leaf: its own, promoted to at least float32."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _widest(tree: Any) -> jnp.dtype:
    dtypes = [compute_dtype(x) for x in jax.tree.leaves(tree)]
    return jnp.result_type(*dtypes) if dtypes else jnp.float32


def tree_norm(tree: Any) -> jax.Array:
    """Global L2 norm over every leaf of a pytree, accumulated in at least float32."""
    leaves = jax.tree.leaves(tree)
    dtype = _widest(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves))


def tree_vdot(a: Any, b: Any) -> jax.Array:
    """Inner product of two pytrees of the same structure, in at least float32."""
    dtype = jnp.result_type(_widest(a), _widest(b))
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(jnp.vdot(x.astype(dtype), y.astype(dtype)) for x, y in pairs)


def grad_sq_norm(grads: Any, micro: bool = False) -> jax.Array:
    """‖g‖² as a policy sees it (float32): with ``micro``, the mean over the stacked
    micro-batch gradients (axis 0) of each one's ‖g_j‖²."""
    sq = jax.vmap(tree_vdot)(grads, grads) if micro else tree_vdot(grads, grads)
    return jnp.mean(sq).astype(jnp.float32)


def tree_scale(tree: Any, scale: jax.Array) -> Any:
    """Multiplies every leaf by ``scale``, keeping each leaf's dtype."""
    return jax.tree.map(lambda x: (x.astype(compute_dtype(x)) * scale).astype(x.dtype), tree)


def tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: (x + y.astype(x.dtype)).astype(x.dtype), a, b)


def tree_all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _is_concrete(value: Any) -> bool:
    try:
        np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


def evaluate(
    value: ScalarOrSchedule,
    count: jax.Array,
    low: float = -float("inf"),
    high: float = float("inf"),
) -> jax.Array:
    """A float, traced scalar or optax schedule of the step count, as a float scalar.

    The value is clamped into ``[low, high]``: a schedule or an injected hyperparameter that
    leaves its range at run time is used at the nearest valid value (NaN stays NaN).
    """
    value = jnp.asarray(value(count) if callable(value) else value)
    # The default float (float64 under jax_enable_x64), so float64 params keep their precision.
    value = value.astype(jnp.promote_types(value.dtype, jnp.result_type(float)))
    return jnp.clip(value, low, high)


def check_scalar_or_schedule(
    name: str,
    value: ScalarOrSchedule,
    low: float,
    high: float = float("inf"),
    *,
    open_low: bool = False,
) -> None:
    """Raises a ValueError naming ``name`` when a constant is outside its range or not finite.

    A schedule is checked at step 0; a traced value (``optax.inject_hyperparams`` under
    ``jax.jit``) cannot be checked here and is clamped at run time by :func:`evaluate`.
    """
    shown = value
    if callable(value):
        try:
            value = value(jnp.zeros([], jnp.int32))
        except Exception as err:  # any failure means the callable is not a schedule
            raise TypeError(
                f"{name} is callable but failed on the step count 0 ({err}); a schedule must be "
                "a function of the int32 step count, like those of optax."
            ) from err
        shown = f"{value} (the schedule's value at step 0)"
    if not _is_concrete(value):
        return
    array = np.asarray(value)
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        raise TypeError(
            f"{name} must be a float or an optax schedule (a function of the step count), "
            f"got {type(value).__name__}{' of shape ' + str(array.shape) if array.shape else ''}."
        )
    value = float(array)
    left, right = ("(" if open_low else "["), ("]" if high != float("inf") else ")")
    bad_low = value <= low if open_low else value < low
    if not np.isfinite(value) or bad_low or value > high:
        raise ValueError(
            f"{name} must be finite and lie in {left}{low}, {high}{right}, got {shown}."
        )


def check_constant(name: str, value: Any) -> None:
    """Raises a TypeError naming ``name`` when a hyperparameter that cannot vary is a schedule."""
    if callable(value):
        raise TypeError(f"{name} must be a number (or a traced scalar), not a schedule.")


def check_float_params(params: Any) -> None:
    """Raises a TypeError when a parameter leaf is not floating point (it cannot be perturbed)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"sharpjax transformations need floating-point params; the leaf "
                f"{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}. Keep integer "
                "state out of the params (e.g. in a separate collection) or cast it to float."
            )


# --------------------------------------------------------------------------------------
# Rules.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerturbationRule:
    """Where the second gradient is taken.

    Attributes:
      init: ``params -> state`` of the rule (any pytree; ``()`` when stateless).
      perturb: ``(g, params, state, rho) -> (ε, state, diagnostics)``, with ``g`` the clean
        gradient (already averaged across devices in synced mode) and ``rho`` the radius of
        this step. ``diagnostics`` is a dict of float32 scalars with keys ``diagnostics``.
      diagnostics: names of the diagnostics the rule reports. The rule may also return
        ``perturbation_norm`` (‖ε‖) when it has it for free; the core computes it otherwise.
    """

    init: Callable[[Any], Any]
    perturb: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any, dict[str, jax.Array]]]
    diagnostics: tuple[str, ...] = ()


def _keep_gradient(g: Any, state: Any, count: jax.Array) -> tuple[Any, Any, dict]:
    del count
    return g, state, {}


@dataclasses.dataclass(frozen=True)
class CombinationRule:
    """What to do with the two gradients.

    Attributes:
      init: ``params -> state``.
      combine: ``(g, g₂, state, count) -> (out, state, diagnostics)``.
      diagnostics: names of the diagnostics the rule reports (on every step).
      skip: ``(g, state, count) -> (out, state, diagnostics)``, the output of a step on which a
        :class:`SecondGradientPolicy` decided not to take ``g₂`` (same diagnostics keys as
        ``combine``); default: the clean gradient ``g``.
      uses_clean_gradient: whether ``combine`` reads ``g`` (so ``g`` is alive through the second
        pass anyway and the ``cosine`` diagnostic is free); False for SAM's rule.
    """

    init: Callable[[Any], Any]
    combine: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any, dict[str, jax.Array]]]
    diagnostics: tuple[str, ...] = ()
    skip: Callable[[Any, Any, jax.Array], tuple[Any, Any, dict[str, jax.Array]]] = _keep_gradient
    uses_clean_gradient: bool = True


@dataclasses.dataclass(frozen=True)
class SecondGradientPolicy:
    """Whether this step takes the second gradient at all (the efficient variants).

    The decision runs before the perturbation; when it is False the second pass is skipped
    under ``lax.cond`` (a skipped step costs one gradient), the perturbation rule's state is
    left as it was, and the output is the combination rule's ``skip``.

    Attributes:
      init: ``params -> state``.
      decide: ``(grad_sq_norm, state, count) -> (take, state, diagnostics)``. ``grad_sq_norm``
        is ‖g‖² of the clean gradient, averaged over the devices of ``axis_name`` (and over
        micro-batches), so every device takes the same decision from the same state; ``take``
        is a boolean scalar. Randomness lives in the state (a key), which is replicated.
      diagnostics: names of the diagnostics the policy reports.
    """

    init: Callable[[Any], Any]
    decide: Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any, dict[str, jax.Array]]]
    diagnostics: tuple[str, ...] = ()


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["state"],
    meta_fields=["ahead", "needs_grad_sq", "num_microbatches"],
)
@dataclasses.dataclass(frozen=True)
class PlannedPolicyState:
    """The state of a policy whose decision can be read before the update.

    ``ahead(state, count, grad_sq) -> take`` is static (pytree metadata):
    :func:`sharpjax.efficient.plan_second_gradient` finds it in an optimizer state and gives
    the step's decision before ``tx.update``, so that a training loop can run one of two
    compiled programs (:func:`sharpjax.efficient.planned_step`) instead of a ``lax.cond``.
    LookSAM's and RST's policies decide from the state and the step count alone
    (``needs_grad_sq`` False: known before the step); AE-SAM's needs this step's ‖g‖² (known
    once the clean gradient is). ``num_microbatches`` is set by :func:`sharpness_aware` (None,
    or m when the clean gradients come stacked over m micro-batches), so that the plan computes
    ‖g‖² as the step does. The leaves are ``state``'s alone (checkpoints hold only them).
    """

    state: Any
    ahead: Callable[[Any, jax.Array, jax.Array | None], jax.Array]
    needs_grad_sq: bool = False
    num_microbatches: int | None = None


def _no_state(params: Any) -> tuple:
    del params
    return ()


def use_second_gradient() -> CombinationRule:
    """The SAM combination: the output is ``g₂`` itself."""

    def combine(g, g2, state, count):
        del g, count
        return g2, state, {}

    return CombinationRule(_no_state, combine, uses_clean_gradient=False)


# --------------------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------------------

CORE_DIAGNOSTICS = (
    "grad_norm",
    "perturbation_norm",
    "second_grad_norm",
    "cosine",
    "rho",
    "loss",
    "perturbed_loss",
    "sharpness",
    "nonfinite_second_gradients",
)
POLICY_DIAGNOSTICS = ("second_gradient", "second_gradient_fraction")


class SharpnessAwareState(NamedTuple):
    """State of :func:`sharpness_aware`.

    Attributes:
      count: number of updates taken (the argument of ``rho`` and of the rules' schedules).
      perturbation_state: state of the perturbation rule (stacked over micro-batches when
        ``num_microbatches > 1``).
      combination_state: state of the combination rule (stacked likewise).
      policy_state: state of the :class:`SecondGradientPolicy` (``()`` without one).
      second_gradients: number of steps that took the second gradient.
      diagnostics: float32 scalars: ``grad_norm`` (‖g‖), ``perturbation_norm`` (‖ε‖),
        ``second_grad_norm`` (‖g₂‖), ``cosine`` (between g and g₂; only where measured, see
        ``cosine`` of :func:`sharpness_aware`), ``rho``; ``loss`` (given as ``loss=``),
        ``perturbed_loss`` (L(w + ε), given by ``value_and_grad_fn``) and ``sharpness`` (their
        difference, GSAM's surrogate gap); those of the rules (e.g. SANER's
        ``masked_fraction``, VaSSO's ``d_norm``); with a policy, ``second_gradient`` (1 if this
        step took g₂) and ``second_gradient_fraction`` (so far); ``nonfinite_second_gradients``
        (steps whose ε or g₂ was not finite, their output zeroed). Read them from a chained
        state with :func:`diagnostics`.

        One convention for every variant: a value known at construction never to be measured
        is left out (``cosine`` of SAM's rule without ``cosine=True``); a value the last step
        did not measure (‖ε‖, ‖g₂‖, the cosine, the perturbed loss and the rules' values on a
        step a policy skipped; ``loss`` without ``loss=``) keeps the value of the last step
        that measured it, and is NaN only if none has (``second_gradient`` says whether this
        step took g₂). A non-finite step shows its own (non-finite) values.
    """

    count: jax.Array
    perturbation_state: Any
    combination_state: Any
    diagnostics: dict[str, jax.Array]
    policy_state: Any = ()
    second_gradients: Any = ()


def _check_grad_fn(grad_fn: Callable | None, value_and_grad_fn: Callable | None) -> Callable:
    """The second-pass function as ``params -> (loss or None, grads)``."""
    if grad_fn is not None and value_and_grad_fn is not None:
        raise TypeError("Pass either `grad_fn` or `value_and_grad_fn` to update, not both.")
    fn = grad_fn if grad_fn is not None else value_and_grad_fn
    if fn is None:
        raise TypeError(
            f"sharpjax transformations need a `grad_fn` extra argument. {_CALL_PATTERN}"
        )
    name = "grad_fn" if grad_fn is not None else "value_and_grad_fn"
    if not callable(fn):
        raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}. {_CALL_PATTERN}")
    if grad_fn is not None:
        return lambda *args: (None, grad_fn(*args))

    def with_value(*args):
        out = value_and_grad_fn(*args)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                "value_and_grad_fn(params) must return (loss, grads), like "
                f"jax.value_and_grad(loss_fn); got {type(out).__name__}."
            )
        return out

    return with_value


_GRAD_FN_HINT = (
    "grad_fn(p) should return jax.grad(loss_fn)(p, batch), not (loss, grads) or aux "
    "(for (loss, grads) pass value_and_grad_fn= instead)."
)
_UPDATES_HINT = (
    "`updates`, the first argument of tx.update, must be the clean gradient "
    "jax.grad(loss_fn)(params, batch): one leaf per parameter, of the parameter's shape."
)


def _check_same_structure(
    name: str, reference: Any, tree: Any, hint: str = _GRAD_FN_HINT, leading: tuple = ()
) -> None:
    """A clear error naming ``name`` when ``tree`` has not the params' structure, or a leaf
    not their shape (behind ``leading`` axes)."""
    ref_def, tree_def = jax.tree.structure(reference), jax.tree.structure(tree)
    if ref_def != tree_def:
        raise ValueError(
            f"{name} must be a pytree with the structure of the params.\n"
            f"  params:  {ref_def}\n  {name}: {tree_def}\n{hint}"
        )
    paths = jax.tree_util.tree_leaves_with_path(reference)
    for (path, ref), leaf in zip(paths, jax.tree.leaves(tree), strict=True):
        want = (*leading, *jnp.shape(ref))
        if jnp.shape(leaf) != want:
            raise ValueError(
                f"{name} has a leaf {jax.tree_util.keystr(path)} of shape {jnp.shape(leaf)} "
                f"where {want} is expected (the params' {jnp.shape(ref)}"
                f"{' behind ' + str(leading) if leading else ''}). {hint}"
            )


def check_axis_name(axis_name: str) -> int:
    """Size of a bound mapped axis, or a clear error when ``axis_name`` is not bound."""
    try:
        return jax.lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here: call the update inside "
            f"jax.pmap(..., axis_name={axis_name!r}) or jax.shard_map over a mesh with that axis "
            "name, or leave axis_name=None on a single device."
        ) from err


def _axis_groups(axis_name: str, mode: str, group_size: int | None) -> list[list[int]] | None:
    """Device groups whose gradients are averaged before perturbing (None: all devices)."""
    size = check_axis_name(axis_name)
    if mode == "synced":
        return None
    group = 1 if mode == "per_device" else group_size
    if size % group:
        raise ValueError(
            f"group_size={group} does not divide the {size} devices of axis {axis_name!r}; "
            f"choose a divisor of {size}."
        )
    if mode == "grouped" and group == size:  # one group of all devices: synced, by pmean
        return None
    return [list(range(start, start + group)) for start in range(0, size, group)]


def _group_mean(tree: Any, axis_name: str, groups: list[list[int]] | None) -> Any:
    if groups is not None and len(groups[0]) == 1:
        return tree
    if groups is None:
        return jax.lax.pmean(tree, axis_name)
    # pmean with axis_index_groups is not implemented on every backend (CPU); a masked psum
    # over the whole axis computes the same group mean everywhere.
    group_size = len(groups[0])
    index = jax.lax.axis_index(axis_name)
    size = group_size * len(groups)
    my_group = index // group_size
    member_group = jnp.arange(size) // group_size
    onehot = (member_group == my_group).astype(jnp.float32) / group_size

    def mean_leaf(x):
        gathered = jax.lax.all_gather(x, axis_name)
        weights = onehot.reshape((size,) + (1,) * x.ndim).astype(gathered.dtype)
        return jnp.sum(gathered * weights, axis=0).astype(x.dtype)

    return jax.tree.map(mean_leaf, tree)


def _check_planned(planned: Any, policy: SecondGradientPolicy | None) -> bool | None:
    """``second_gradient=True/False`` (a Python bool): the policy's decision, taken before the
    step by the caller (:func:`sharpjax.efficient.planned_step`), which then compiles one
    program per decision instead of a ``lax.cond`` (a conv gradient under ``lax.cond`` is many
    times slower on XLA:CPU: ``experiments/benchmarks/cond.py``). The policy still updates its
    state."""
    if planned is not None and not isinstance(planned, bool | np.bool_):
        raise TypeError(
            "second_gradient must be a Python bool decided before the step (or None), got "
            f"{type(planned).__name__}; a traced decision is the policy's, under lax.cond."
        )
    if policy is None and planned is not None and not planned:
        raise ValueError("second_gradient=False needs a SecondGradientPolicy to skip by.")
    return None if planned is None else bool(planned)


def _check_update_inputs(
    updates: Any, params: Any, m: int | None, policy: SecondGradientPolicy | None = None
) -> None:
    """Clear errors for the params and the clean gradients ``updates`` of ``tx.update``."""
    if params is None:
        raise ValueError("sharpjax transformations need params: tx.update(g, state, params).")
    check_float_params(params)
    if updates is None:  # m-sharpness at SAM's memory: the clean gradients come from grad_fn
        if m is None:
            raise ValueError(
                "updates=None (the clean gradients computed inside the step, one micro-batch "
                "at a time) needs num_microbatches; without it pass the clean gradient: "
                "tx.update(grads, state, params, grad_fn=grad_fn)."
            )
        if policy is not None:
            raise ValueError(
                "updates=None does not take a SecondGradientPolicy (its decision needs the "
                "clean gradients before the step): pass the stacked clean gradients instead "
                "(sharpjax.microbatch_value_and_grad)."
            )
        return
    if m is None:
        _check_same_structure("updates", params, updates, _UPDATES_HINT)
    else:
        hint = (
            f"num_microbatches={m} expects in `updates` the clean gradients of the "
            "micro-batches stacked on axis 0, shape (m, *param.shape). See "
            "sharpjax.split_microbatches and sharpjax.microbatch_value_and_grad."
        )
        _check_same_structure("updates", params, updates, hint, leading=(m,))


def _keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old``, leaf by leaf (a non-finite step changes no state)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _check_count(argument: str, value: int) -> None:
    if isinstance(value, jax.Array):
        raise TypeError(
            f"{argument} must be a Python int (it fixes the program's shape), got an array; "
            f"under optax.inject_hyperparams pass static_args=({argument!r},)."
        )
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{argument} must be an int >= 1, got {value!r}.")


# --------------------------------------------------------------------------------------
# The pieces of one step. Each is a module-level function of its inputs, so that a test can
# call it alone; the update of `sharpness_aware` is the page that calls them in order:
#
#     take            = _decide(...)                             the efficient variants
#     out, states, …  = _take_or_skip(...): _with_second(...) if take else _without_second(...)
#                       └ _single | _vmapped | _scanned, each calling _perturb_and_combine
#                     | _microbatches_from_grad_fn(...)          updates=None (lean mSAM)
#                     | _ascent(...)                             sharpjax.drop_in's ascent
#     diagnostics     = _step_diagnostics(...)
#     out, state      = _guard(...)                              the non-finite guard
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What the constructor fixed for every step: the rules and the static settings."""

    perturbation: PerturbationRule
    combination: CombinationRule
    policy: SecondGradientPolicy | None = None
    num_microbatches: int | None = None
    axis_name: str | None = None
    measure_cosine: bool = False
    microbatch_execution: str = "sequential"

    @property
    def micro(self) -> bool:
        return self.num_microbatches is not None

    @property
    def branch_diagnostics(self) -> tuple[str, ...]:
        """The keys that both branches (with and without g₂) report."""
        cosine = ("cosine",) if self.measure_cosine else ()
        core = ("grad_norm", "perturbation_norm", "second_grad_norm", *cosine, "perturbed_loss")
        return core + self.perturbation.diagnostics + self.combination.diagnostics

    @property
    def diagnostic_names(self) -> tuple[str, ...]:
        """Every key of the state's diagnostics, fixed at construction."""
        names = CORE_DIAGNOSTICS
        if not self.measure_cosine:  # known at construction not to be measured: left out
            names = tuple(n for n in names if n != "cosine")
        names += self.perturbation.diagnostics + self.combination.diagnostics
        if self.policy is not None:
            names += POLICY_DIAGNOSTICS + self.policy.diagnostics
        return names


@dataclasses.dataclass(frozen=True)
class _Step:
    """What one call of ``update`` fixes: the point ``w``, the step count, ρ_t, the second pass
    (``(params[, j]) -> (loss or None, g₂)``) and the last diagnostics (carried where this
    step measures nothing)."""

    setup: _Setup
    params: Any
    count: jax.Array
    rho: jax.Array
    second_pass: Callable
    previous: dict[str, jax.Array]
    groups: list[list[int]] | None = None


def _device_mean(tree: Any, axis_name: str | None) -> Any:
    """The mean over the devices of ``axis_name`` (identity on one device)."""
    return jax.lax.pmean(tree, axis_name) if axis_name is not None else tree


def _micro_mean(tree: Any) -> Any:
    """The mean over the micro-batch axis (axis 0) of every leaf."""
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _f32(diag: dict[str, Any]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in diag.items()}


def _as_params(tree: Any, params: Any) -> Any:
    return jax.tree.map(lambda o, w: o.astype(w.dtype), tree, params)


def _decide(
    policy: SecondGradientPolicy | None,
    g: Any,
    policy_state: Any,
    count: jax.Array,
    *,
    micro: bool = False,
    axis_name: str | None = None,
    planned: bool | None = None,
) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    """``take, state, diag = policy.decide(‖g‖², state, t)``, before any perturbation.

    ‖g‖² (with ``micro``, the mean over the stacked micro-batch gradients of ‖g_j‖²) is averaged
    over ``axis_name``, so that every device takes the same decision. ``planned``, a Python bool
    decided before the step, replaces the decision (the policy still updates its state).
    Without a policy every step takes g₂.
    """
    if policy is None:
        return jnp.bool_(True), policy_state, {}
    sq = _device_mean(grad_sq_norm(g, micro), axis_name)
    take, policy_state, diag = policy.decide(sq, policy_state, count)
    take = jnp.asarray(take if planned is None else bool(planned), jnp.bool_)
    return take, policy_state, diag


def _perturb_and_combine(
    step: _Step, g: Any, p_state: Any, c_state: Any, j: jax.Array | None = None
) -> tuple[Any, Any, Any, dict[str, jax.Array], jax.Array]:
    """One micro-batch ``j`` (or the whole batch, ``j`` None)::

        ε, p_state      = perturb(g, w, p_state, ρ)
        g₂              = ∇L(w + ε)                       (micro-batch j's)
        out, c_state    = combine(g, g₂, c_state, t)

    Returns ``(out, p_state, c_state, diag, finite)``: ``out`` in the params' dtypes, the
    diagnostics of :attr:`_Setup.branch_diagnostics` (``perturbed_loss`` carried from
    ``step.previous`` without ``value_and_grad_fn``), and ``finite``, two booleans: whether g
    is finite, and whether ε and g₂ are.
    """
    setup, params = step.setup, step.params
    eps, p_state, p_diag = setup.perturbation.perturb(g, params, p_state, step.rho)
    # ‖ε‖ comes from the rule when it has it for free: computing it here would keep ε
    # alive through the second pass (a parameter copy, measured with memory_analysis).
    p_diag = dict(p_diag)
    eps_norm = p_diag.pop("perturbation_norm", None)
    eps_norm = tree_norm(eps) if eps_norm is None else eps_norm
    grad_norm = tree_norm(g)
    perturbed = tree_add(params, eps)
    loss2, g2 = step.second_pass(perturbed) if j is None else step.second_pass(perturbed, j)
    _check_same_structure("the second gradient", params, g2)
    if setup.axis_name is not None:
        g2 = _group_mean(g2, setup.axis_name, step.groups)
    out, c_state, c_diag = setup.combination.combine(g, g2, c_state, step.count)
    g2_norm = tree_norm(g2)
    diag = {
        "grad_norm": grad_norm,
        "perturbation_norm": eps_norm,
        "second_grad_norm": g2_norm,
        "perturbed_loss": step.previous["perturbed_loss"] if loss2 is None else loss2,
        **p_diag,
        **c_diag,
    }
    # Reading g here keeps it alive through the second pass (a parameter copy unless
    # the combination reads g anyway): hence opt-in for SAM's rule.
    if setup.measure_cosine:
        diag["cosine"] = tree_vdot(g, g2) / (grad_norm * g2_norm + NORM_EPS)
    # A NaN or Inf anywhere in g, in a rule state, in ρ or in g₂ shows in these norms.
    second = jnp.isfinite(eps_norm) & jnp.isfinite(g2_norm)
    finite = jnp.stack([jnp.isfinite(grad_norm), second])
    return _as_params(out, params), p_state, c_state, _f32(diag), finite


def _single(step: _Step, g: Any, p_state: Any, c_state: Any) -> tuple:
    """The whole batch at once: :func:`_perturb_and_combine` without a micro-batch index."""
    return _perturb_and_combine(step, g, p_state, c_state)


def _vmapped(step: _Step, g: Any, p_state: Any, c_state: Any) -> tuple:
    """The m micro-batches at once under ``jax.vmap`` (m perturbed copies alive together);
    the output and the diagnostics are the means over micro-batches."""
    m = step.setup.num_microbatches
    one = functools.partial(_perturb_and_combine, step)
    out, p_state, c_state, diag, finite = jax.vmap(one)(g, p_state, c_state, jnp.arange(m))
    return _micro_mean(out), p_state, c_state, _micro_mean(diag), jnp.all(finite, axis=0)


def _scanned(step: _Step, g: Any, p_state: Any, c_state: Any) -> tuple:
    """The m micro-batches one after another under ``lax.scan``, summing the outputs, so
    that the compile time does not grow with m and no m-fold ε or g₂ is ever stored."""
    m = step.setup.num_microbatches

    def body(total, inputs):
        g, p_state, c_state, j = inputs
        out, p_state, c_state, diag, finite = _perturb_and_combine(step, g, p_state, c_state, j)
        return tree_add(total, out), (p_state, c_state, diag, finite)

    zeros = jax.tree.map(jnp.zeros_like, step.params)
    inputs = (g, p_state, c_state, jnp.arange(m))
    total, (p_state, c_state, diag, finite) = jax.lax.scan(body, zeros, inputs)
    out = tree_scale(total, 1.0 / m)
    return out, p_state, c_state, _micro_mean(diag), jnp.all(finite, axis=0)


def _microbatches_from_grad_fn(
    step: _Step, p_state: Any, c_state: Any, with_loss: bool
) -> tuple[Any, Any, Any, dict[str, jax.Array], jax.Array, jax.Array | None]:
    """m-sharpness without the stacked clean gradients (``updates=None``): micro-batch j's
    clean ``(L_j(w), g_j) = second_pass(w, j)`` is taken where it is used.

    ``"sequential"``: inside the scan body, so that one micro-batch's g, ε and g₂ are alive at
    a time (SAM's memory whatever m). ``"parallel"``: the m clean gradients at once under
    ``vmap``, then :func:`_vmapped`. Returns :func:`_scanned`'s tuple and the mean clean loss
    (None without ``with_loss``).
    """
    setup, params = step.setup, step.params
    m = setup.num_microbatches

    def clean(j):
        loss, g = step.second_pass(params, j)
        _check_same_structure("grad_fn(params, j)", params, g)
        loss = jnp.float32(jnp.nan) if loss is None else jnp.asarray(loss, jnp.float32)
        return loss, g

    if setup.microbatch_execution == "parallel":
        losses, g = jax.vmap(clean)(jnp.arange(m))
        return (*_vmapped(step, g, p_state, c_state), jnp.mean(losses) if with_loss else None)

    def body(total, inputs):
        p_state, c_state, j = inputs
        loss, g = clean(j)
        out, p_state, c_state, diag, finite = _perturb_and_combine(step, g, p_state, c_state, j)
        return tree_add(total, out), (p_state, c_state, diag, finite, loss)

    zeros = jax.tree.map(jnp.zeros_like, params)
    inputs = (p_state, c_state, jnp.arange(m))
    total, (p_state, c_state, diag, finite, losses) = jax.lax.scan(body, zeros, inputs)
    out = tree_scale(total, 1.0 / m)
    clean_loss = jnp.mean(losses) if with_loss else None
    return out, p_state, c_state, _micro_mean(diag), jnp.all(finite, axis=0), clean_loss


def _with_second(step: _Step, g: Any, p_state: Any, c_state: Any) -> tuple:
    """A step that takes g₂, in the execution form the setup asks for."""
    setup = step.setup
    if not setup.micro:
        return _single(step, g, p_state, c_state)
    form = _vmapped if setup.microbatch_execution == "parallel" else _scanned
    return form(step, g, p_state, c_state)


def _without_second(step: _Step, g: Any, p_state: Any, c_state: Any) -> tuple:
    """A step a policy skips: ``out, c_state = combination.skip(g, c_state, t)``, no g₂ at all;
    the perturbation state is left as it was. What the step does not measure (‖ε‖, ‖g₂‖, the
    cosine, the perturbed loss, the rules' values that ``skip`` does not report) keeps its
    value of the last step that measured it (``step.previous``)."""
    setup, count = step.setup, step.count
    skip = setup.combination.skip
    if setup.micro:
        out, c_state, c_diag = jax.vmap(lambda g, c: skip(g, c, count))(g, c_state)
        out, c_diag = _micro_mean(out), _micro_mean(c_diag)
        grad_norm = jnp.mean(jax.vmap(tree_norm)(g))
    else:
        out, c_state, c_diag = skip(g, c_state, count)
        grad_norm = tree_norm(g)
    diag = {k: step.previous[k] for k in setup.branch_diagnostics}
    diag.update(c_diag, grad_norm=grad_norm)
    finite = jnp.stack([tree_all_finite(g), jnp.bool_(True)])
    return _as_params(out, step.params), p_state, c_state, _f32(diag), finite


def _take_or_skip(
    step: _Step, take: jax.Array, planned: bool | None, g: Any, p_state: Any, c_state: Any
) -> tuple:
    """:func:`_with_second` or :func:`_without_second` as the decision says: one branch when
    it is known before the step (no policy, or ``planned``), else under ``lax.cond``."""
    if step.setup.policy is None or planned is not None:
        # No decision to take in the program: one branch, no lax.cond (a conv gradient
        # under lax.cond is many times slower on XLA:CPU: experiments/benchmarks/cond.py).
        branch = _with_second if planned is None or planned else _without_second
        return branch(step, g, p_state, c_state)
    with_second = functools.partial(_with_second, step)
    without_second = functools.partial(_without_second, step)
    return jax.lax.cond(take, with_second, without_second, g, p_state, c_state)


def _step_diagnostics(
    setup: _Setup,
    diag: dict[str, jax.Array],
    previous: dict[str, jax.Array],
    *,
    loss: Any,
    perturbed_loss_measured: bool,
    rho: jax.Array,
    count: jax.Array,
    take: jax.Array,
    finite: jax.Array,
    policy_diag: dict[str, jax.Array],
    second_gradients: jax.Array,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """The state's diagnostics from a branch's: the losses, ρ, the policy's, the count of
    dropped non-finite second gradients, the device mean.

    ``loss`` (the clean loss, or the m micro-batch losses: their mean) is carried from
    ``previous`` when None; ``sharpness`` = perturbed − clean loss when this step measured both
    (``perturbed_loss_measured``: ``value_and_grad_fn`` was given, and ``take``), else carried.
    Returns the diagnostics (float32, exactly the keys of ``setup.diagnostic_names``) and the
    new count of steps that took g₂.
    """
    diag = dict(diag)
    if loss is None:
        diag["loss"] = previous["loss"]
        diag["sharpness"] = previous["sharpness"]
    else:
        diag["loss"] = jnp.mean(jnp.asarray(loss, jnp.float32))
        measured = jnp.bool_(perturbed_loss_measured) & take
        gap = diag["perturbed_loss"] - diag["loss"]
        diag["sharpness"] = jnp.where(measured, gap, previous["sharpness"])
    dropped = (finite[0] & ~finite[1]).astype(jnp.float32)
    diag["nonfinite_second_gradients"] = previous["nonfinite_second_gradients"] + dropped
    if "surrogate_gap" in setup.diagnostic_names:  # GSAM's name for the same quantity
        diag["surrogate_gap"] = diag["sharpness"]
    diag["rho"] = rho
    if setup.policy is not None:
        took = take.astype(jnp.int32)
        seconds = second_gradients + took
        diag.update(policy_diag)
        diag["second_gradient"] = took
        diag["second_gradient_fraction"] = seconds / (count + 1)
    else:
        seconds = second_gradients + 1
    diag = _device_mean(diag, setup.axis_name)
    return {k: jnp.asarray(diag[k], jnp.float32) for k in setup.diagnostic_names}, seconds


class AscentProbe(NamedTuple):
    """What an update with ``drop_in_ascent=True`` returns as its state (for
    :func:`sharpjax.drop_in`, which reads it and throws it away): this step's ``ε`` (zero
    when the policy skips g₂ or ε is not finite) and the decision ``take``."""

    eps: Any
    take: jax.Array


def _ascent(step: _Step, g: Any, p_state: Any, take: jax.Array) -> tuple[Any, AscentProbe]:
    """The drop-in ascent: ``ε = perturb(g)`` as the update (it moves w to w + ε), nothing
    else. The rule state is not moved here: the descent's update recomputes ε from the same
    g and state, so that every state moves once per step."""
    if step.setup.micro:
        raise ValueError(
            "sharpjax.drop_in does not take num_microbatches (each micro-batch has its own ε, "
            "but the params can be moved to only one w + ε): use the grad_fn form of msam."
        )
    eps, _, diag = step.setup.perturbation.perturb(g, step.params, p_state, step.rho)
    eps_norm = diag.get("perturbation_norm", None)
    eps_norm = tree_norm(eps) if eps_norm is None else eps_norm
    # A non-finite ε moves nothing: the descent's update sees it again and zeroes its output.
    move = take & jnp.isfinite(eps_norm)
    eps = jax.tree.map(lambda e: jnp.where(move, e, jnp.zeros_like(e)), eps)
    eps = _as_params(eps, step.params)
    return eps, AscentProbe(eps, take)


def _initial_diagnostics(names: Sequence[str]) -> dict[str, jax.Array]:
    """NaN (never measured) for every value, 0 for the count of dropped second gradients."""
    nan = float("nan")
    return {
        n: jnp.full([], 0.0 if n == "nonfinite_second_gradients" else nan, jnp.float32)
        for n in names
    }


def _refuse_multisteps() -> None:
    """A clear error when the transformation is being built inside ``optax.MultiSteps``.

    MultiSteps hands its inner ``update`` the mean of the accumulated clean gradients but the
    ``grad_fn`` of the last mini-batch alone, and keeps the inner state only on the last
    mini-step: the second gradient would be the last mini-batch's, not the mean over all.
    The call stack is the only place that says so (MultiSteps.init calls our init directly).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), optax.MultiSteps):
            raise ValueError(
                "sharpjax transformations cannot run inside optax.MultiSteps: it would take "
                "the second gradient g₂ = ∇L(w + ε) on the last mini-batch only, where SAM "
                "needs the mean over all of them. Accumulate inside one step instead: "
                "sharpjax.parallel.make_train_step(..., num_micro_steps=k) (the trainer's "
                "--num_micro_steps), which accumulates both passes over k micro-batches "
                "(sharpjax.parallel.accumulated_grad_fn gives such a grad_fn for your own "
                "loop); or m-sharpness with one ε per micro-batch, sharpjax.msam(rho, m)."
            )
        frame = frame.f_back


def _guard(
    finite: jax.Array, out: Any, new_state: SharpnessAwareState, state: SharpnessAwareState
) -> tuple[Any, SharpnessAwareState]:
    """The non-finite guard, ``finite = (g finite, ε and g₂ finite)``.

    A step that is not finite changes no state (it would poison VaSSO's d, for instance); the
    diagnostics show the step as it was. A non-finite clean gradient g is passed on in ``out``
    (``optax.apply_if_finite`` sees it in its input and skips the step). A non-finite ε or g₂
    from a finite g (the loss overflows at w + ε, an injected ρ is NaN) cannot be seen by
    ``apply_if_finite``, which checks only its input: ``out`` is zero instead (selected, not
    mixed: the NaN does not leak), and the diagnostics count it in
    ``nonfinite_second_gradients``.
    """
    dropped = finite[0] & ~finite[1]
    out = jax.tree.map(lambda o: jnp.where(dropped, jnp.zeros_like(o), o), out)
    kept = state._replace(diagnostics=new_state.diagnostics)
    return out, _keep_if(finite[0] & finite[1], new_state, kept)


def sharpness_aware(
    perturbation: PerturbationRule,
    combination: CombinationRule | None = None,
    rho: ScalarOrSchedule = 0.05,
    *,
    policy: SecondGradientPolicy | None = None,
    num_microbatches: int | None = None,
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
    cosine: bool | None = None,
    microbatch_execution: str = "sequential",
) -> optax.GradientTransformationExtraArgs:
    """The two-gradient transformation: any perturbation rule with any combination rule.

    Put it before the base optimizer in an ``optax.chain`` and pass ``grad_fn``::

        tx = optax.chain(sharpness_aware(vasso_perturbation(0.9), saner_combination(0.5),
                                         rho=0.1), optax.sgd(0.1, momentum=0.9))
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

    Args:
      perturbation: where the second gradient is taken (``sam_perturbation()``, ...).
      combination: what to do with ``g`` and ``g₂``; default: return ``g₂`` (SAM).
      rho: perturbation radius, a float ≥ 0, an optax schedule of the step count, or a traced
        scalar (``optax.inject_hyperparams``). Clamped to ≥ 0 at run time.
      policy: decides per step whether to take ``g₂`` at all (LookSAM, RST, AE-SAM); default:
        always.
      num_microbatches: None (the default: one batch), or m ≥ 1 for m-sharpness (mSAM, the
        micro-batch contract even for m = 1): ``updates`` are the clean
        per-micro-batch gradients stacked on a leading axis of size m, ``grad_fn(params, j)``
        returns the gradient on micro-batch ``j`` (an int32 scalar, possibly traced), each
        micro-batch gets its own ε and rule state, and the output is the mean over
        micro-batches (the params' shape). With ``axis_name``, only ``"per_device"`` mode.
        ``updates=None`` instead of the stacked gradients: the clean ``g_j`` is
        ``grad_fn(params, j)`` too, taken inside the step one micro-batch at a time (SAM's
        memory plus one accumulator whatever m; no policy; see :func:`sharpjax.msam`).
      microbatch_execution: how the m second passes run. ``"sequential"`` (default): one
        after another under ``lax.scan``, summing the outputs: the memory of one micro-batch
        and a compile time that does not grow with m. ``"parallel"``: all at once under
        ``jax.vmap`` (m perturbed copies of the params and m second gradients alive at once);
        when the micro-batches are sharded over devices (the trainer's per-device mode under
        GSPMD) each device runs its own, where a sequential scan would gather every
        micro-batch onto every device. Same result either way. On XLA:CPU a convolution's
        gradient inside a scan body runs slower than outside it (XLA:CPU canonicalises only
        the entry computation's convolutions; ``experiments/benchmarks/cond.py``: 15x on an
        8x8 CNN, 3x on a 28x28 LeNet): there ``"parallel"`` can be the faster (3.5x for mSAM
        with m = 8 on the small CNN, ``experiments/benchmarks/steps.py``).
      axis_name: data-parallel axis (pmap / shard_map); None on one device.
      perturbation_mode: with ``axis_name``: ``"per_device"`` (each device perturbs with its
        own gradient, the original SAM), ``"synced"`` (all devices share the perturbation of
        the averaged gradient) or ``"grouped"`` (shared within groups of ``group_size``
        consecutive devices). The final gradient is always averaged over ``axis_name``.
      group_size: devices per group in ``"grouped"`` mode; must divide the device count.
      cosine: whether the diagnostics carry ``cosine``, the cosine between ``g`` and ``g₂``
        (the key is left out when not measured). It needs ``g`` alive through the second
        pass: free when the combination reads ``g`` anyway (SANER, GSAM, LookSAM), one
        parameter copy of memory otherwise (SAM's rule; measured with
        ``experiments/benchmarks/memory.py``). Default None: measured exactly when it is free.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes these extra
      arguments:

      * ``grad_fn``: ``params -> gradient`` (the params' pytree structure), called once per
        step at ``w + ε`` (never on a step the policy skips); or
      * ``value_and_grad_fn``: ``params -> (loss, gradient)`` instead, so that the diagnostics
        carry ``perturbed_loss``;
      * ``loss`` (optional): the clean loss L(w), for the ``loss`` and ``sharpness``
        diagnostics (a scalar, or the m micro-batch losses).

      With BatchNorm, ``grad_fn`` evaluates the model at the clean pass's statistics and drops
      the statistics it would update::

        def grad_fn(p):
          def loss(p):
            logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])  # discarded
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
          return jax.grad(loss)(p)
    """
    combination = combination or use_second_gradient()
    check_scalar_or_schedule("rho", rho, 0.0)
    if num_microbatches is not None:
        _check_count("num_microbatches", num_microbatches)
    if perturbation_mode not in PERTURBATION_MODES:
        raise ValueError(
            f"perturbation_mode must be one of {PERTURBATION_MODES}, got {perturbation_mode!r}."
        )
    if perturbation_mode == "grouped":
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(
                f"perturbation_mode='grouped' needs group_size, a positive int, got {group_size!r}."
            )
    elif group_size is not None:
        raise ValueError("group_size is only used with perturbation_mode='grouped'.")
    if axis_name is None and (perturbation_mode != "per_device" or group_size is not None):
        raise ValueError(
            f"perturbation_mode={perturbation_mode!r} needs axis_name, the data-parallel axis."
        )
    if num_microbatches is not None and perturbation_mode != "per_device":
        raise ValueError(
            f"num_microbatches={num_microbatches} (m-sharpness) perturbs each micro-batch on "
            f"its own; it combines only with perturbation_mode='per_device', got "
            f"{perturbation_mode!r}."
        )
    if cosine is not None and not isinstance(cosine, bool):
        raise TypeError(f"cosine must be True, False or None, got {cosine!r}.")
    if microbatch_execution not in MICROBATCH_EXECUTIONS:
        raise ValueError(
            f"microbatch_execution must be one of {MICROBATCH_EXECUTIONS}, got "
            f"{microbatch_execution!r}."
        )
    setup = _Setup(
        perturbation,
        combination,
        policy,
        num_microbatches,
        axis_name,
        combination.uses_clean_gradient if cosine is None else cosine,
        microbatch_execution,
    )
    m, micro = num_microbatches, num_microbatches is not None

    def stacked(init):
        return (lambda p: jax.vmap(lambda _: init(p))(jnp.arange(m))) if micro else init

    def _policy_init(params):
        if policy is None:
            return ()
        state = policy.init(params)
        # A plannable policy computes ‖g‖² outside the step too, so it must know whether the
        # gradients come stacked over micro-batches.
        if micro and isinstance(state, PlannedPolicyState):
            state = dataclasses.replace(state, num_microbatches=m)
        return state

    def init_fn(params):
        _refuse_multisteps()
        check_float_params(params)
        return SharpnessAwareState(
            count=jnp.zeros([], jnp.int32),
            perturbation_state=stacked(perturbation.init)(params),
            combination_state=stacked(combination.init)(params),
            diagnostics=_initial_diagnostics(setup.diagnostic_names),
            policy_state=_policy_init(params),
            second_gradients=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates, state, params=None, *, grad_fn=None, value_and_grad_fn=None, loss=None, **extra
    ):
        # sharpjax.drop_in's first call of a step: ε alone, no second pass.
        ascent = extra.pop("drop_in_ascent", False)
        second_pass = None if ascent else _check_grad_fn(grad_fn, value_and_grad_fn)
        planned = _check_planned(extra.pop("second_gradient", None), policy)
        del extra
        _check_update_inputs(updates, params, m, policy)
        if ascent and updates is None:
            raise ValueError("sharpjax.drop_in needs the clean gradient as updates, not None.")
        groups = None
        if axis_name is not None:
            groups = _axis_groups(axis_name, perturbation_mode, group_size)
        step = _Step(
            setup,
            params,
            state.count,
            evaluate(rho, state.count, 0.0),
            second_pass,
            state.diagnostics,
            groups,
        )
        if updates is None:  # m-sharpness at SAM's memory (no policy: checked above)
            out, p_state, c_state, diag, finite, clean_loss = _microbatches_from_grad_fn(
                step,
                state.perturbation_state,
                state.combination_state,
                with_loss=value_and_grad_fn is not None,
            )
            loss = clean_loss if loss is None else loss
            take, policy_state, policy_diag = jnp.bool_(True), state.policy_state, {}
        else:
            g = _group_mean(updates, axis_name, groups) if axis_name is not None else updates
            take, policy_state, policy_diag = _decide(
                policy,
                g,
                state.policy_state,
                step.count,
                micro=micro,
                axis_name=axis_name,
                planned=planned,
            )
            if ascent:
                return _ascent(step, g, state.perturbation_state, take)
            branches = (g, state.perturbation_state, state.combination_state)
            out, p_state, c_state, diag, finite = _take_or_skip(step, take, planned, *branches)

        if axis_name is not None:
            # Synced without micro-batches: g and g₂ are already all-device means, so `out` is
            # the same on every device and a third gradient all-reduce would change nothing.
            if groups is not None or micro:
                out = jax.lax.pmean(out, axis_name)
            finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name).astype(jnp.bool_)
        out = _as_params(out, params)

        diag, seconds = _step_diagnostics(
            setup,
            diag,
            state.diagnostics,
            loss=loss,
            perturbed_loss_measured=value_and_grad_fn is not None,
            finite=finite,
            rho=step.rho,
            count=step.count,
            take=take,
            policy_diag=policy_diag,
            second_gradients=state.second_gradients,
        )
        new_state = SharpnessAwareState(
            count=optax.safe_increment(step.count),
            perturbation_state=p_state,
            combination_state=c_state,
            diagnostics=diag,
            policy_state=policy_state,
            second_gradients=seconds,
        )
        return _guard(finite, out, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def diagnostics(opt_state: Any) -> dict[str, jax.Array]:
    """The last step's diagnostics of every sharpjax transformation in a (chained) state.

    Works on the state of ``optax.chain(...)``, nested chains, ``optax.inject_hyperparams``,
    ``optax.apply_if_finite`` and pmapped/sharded states alike (``optax.MultiSteps`` does not
    take sharpjax transformations: see :func:`sharpness_aware`): it
    collects the ``diagnostics`` dict of each sharpjax state it finds (and the noise-resistant
    feedback's). Keys are unique per chain; when two sharpjax transformations report the same
    key, the later ones get a ``_1``, ``_2`` suffix.

    Example::

        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        sharpjax.diagnostics(opt_state)["second_grad_norm"]
    """
    found: dict[str, jax.Array] = {}

    def reports(node):
        return isinstance(node, SharpnessAwareState) or (
            hasattr(node, "_fields") and "diagnostics" in getattr(node, "_fields", ())
        )

    for node in find_states(opt_state, reports):
        for key, value in node.diagnostics.items():
            name, i = key, 0
            while name in found:
                i += 1
                name = f"{key}_{i}"
            found[name] = value
    return found


def find_states(opt_state: Any, match: Callable[[Any], bool]) -> list[Any]:
    """The nodes of a (chained, nested) optimizer state for which ``match`` is true, in order.

    Walks dicts, lists and tuples (NamedTuple states included), and does not look inside a
    node that matches.
    """
    found: list[Any] = []

    def visit(node):
        if match(node):
            found.append(node)
            return
        if isinstance(node, dict):
            children: Sequence = list(node.values())
        elif isinstance(node, list | tuple):
            children = node
        else:
            return
        for child in children:
            visit(child)

    visit(opt_state)
    return found
