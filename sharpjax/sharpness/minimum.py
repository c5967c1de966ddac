"""Minimum Sharpness (Ibayashi, Hamaguchi & Imaizumi, arXiv 2106.12612)."""

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sharpjax.sharpness._batches import (
    Program,
    check_labelled_batch,
    is_tracing,
    labelled_batches,
    trace,
)
from sharpjax.sharpness._validate import choice, positive_int
from sharpjax.sharpness.diagonal import hessian_diagonal

PyTree = Any


class MinimumSharpnessResult(NamedTuple):
    """Minimum Sharpness and the rescaling that attains it.

    Attributes:
      value: ``min`` over function-preserving rescalings of the Hessian trace restricted to the
        layers' blocks.
      trace: the same trace at the given parameters (no rescaling).
      log_scales: ``granularity="layer"``: array ``(L,)`` of ``s_l = log α_l`` (summing to 0);
        ``granularity="node"``: tuple over hidden layers ``l = 1..L-1`` of arrays of the
        per-unit log-scales ``log a_lj`` (incoming weights and bias times ``a_lj``, outgoing
        weights divided by it).
      num_steps: Newton steps the solver took.
      output_change: ``max |f(w') − f(w)| / max |f(w)|`` over the checked examples, ``w'`` the
        rescaled parameters (:func:`apply_scales`): rounding-small when the rescaling preserves
        the function, as Minimum Sharpness assumes (see ``check`` in
        :func:`minimum_sharpness`).
    """

    value: jax.Array
    trace: jax.Array
    log_scales: jax.Array | tuple[jax.Array, ...]
    num_steps: jax.Array
    output_change: jax.Array | None = None

    @property
    def scales(self) -> jax.Array | tuple[jax.Array, ...]:
        return jax.tree.map(jnp.exp, self.log_scales)


class _Layer(NamedTuple):
    """A layer's static layout (hashable, so it can be a static jit argument)."""

    name: str
    has_bias: bool
    num_in: int  # units of the previous layer (input features for the first layer)
    num_out: int
    num_rows: int  # kernel input rows: num_in, or positions × num_in after a flatten
    channel_first: bool = False  # how a flattened feature map is laid out in the rows

    @property
    def in_units(self) -> np.ndarray:
        """The previous-layer unit of each kernel input row.

        A Dense after a flatten of an NHWC feature map (``x.reshape(n, -1)``) reads channel
        ``r mod C`` at row ``r``; after a channel-first flatten (NCHW, or
        ``x.transpose(0, 3, 1, 2).reshape(n, -1)``) channel ``r // positions``. Max-pooling
        commutes with positive per-channel scaling.
        """
        rows = np.arange(self.num_rows)
        if self.channel_first:
            return rows // (self.num_rows // self.num_in)
        return rows % self.num_in


_LAYOUT = (
    "minimum_sharpness needs a feed-forward chain of Dense/Conv layers, each a collection "
    "{'kernel': (..., in, out), 'bias': (out,)} (flax's layout; bias optional)"
)


def _natural_key(name: str) -> tuple[str, int]:
    """``"Dense_10" -> ("Dense_", 10)``: numbered names in numeric, not string, order."""
    match = re.fullmatch(r"(.*?)(\d+)", name)
    return (match[1], int(match[2])) if match else (name, -1)


def _default_order(params: Mapping) -> list[str]:
    """The params' order when it numbers each family increasingly, else the natural order.

    flax creates its params in definition order (``Conv_0, Conv_1, Dense_0``), but
    ``jax.tree.map``, optax updates and checkpoints return dicts with string-sorted keys, which
    put ``Dense_10`` before ``Dense_2``. Such an order is restored by numeric suffix; families
    keep their order (alphabetical, after a sort), which the shape checks and the output check
    of :func:`minimum_sharpness` catch when it is not the forward order.
    """
    names = list(params)
    keys = [_natural_key(n) for n in names]
    consistent = all(
        a[1] < b[1] for a, b in itertools.combinations(keys, 2) if a[0] == b[0] and a[1] >= 0
    )
    return names if consistent else sorted(names, key=_natural_key)


_FLATTEN = ("channel_last", "channel_first")


def _layers(
    params: PyTree, layers: Sequence[str] | None, flatten: str = "channel_last"
) -> tuple[_Layer, ...]:
    """Validate the kernel/bias layout and map each kernel input row to a previous unit."""
    choice("flatten", flatten, _FLATTEN)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of layer collections; {_LAYOUT}.")
    if set(params) == {"params"}:
        raise ValueError(
            "params looks like flax variables {'params': ...}; pass variables['params'] and "
            "a logits_fn(p, x) that calls model.apply({'params': p}, x)."
        )
    if isinstance(layers, str):
        raise TypeError(
            f"layers must be a sequence of collection names, got the string {layers!r}."
        )
    names = _default_order(params) if layers is None else list(layers)
    if not names:
        raise ValueError("layers is empty; name at least one layer collection.")
    if len(set(names)) != len(names):
        raise ValueError(f"layers names a collection twice: {names}.")
    out: list[_Layer] = []
    prev_ndim = 0
    for name in names:
        if name not in params:
            raise ValueError(
                f"layers names {name!r}, which is not a top-level collection of params "
                f"(available: {list(params)})."
            )
        coll = params[name]
        if not isinstance(coll, Mapping) or "kernel" not in coll:
            raise ValueError(
                f"params[{name!r}] holds no 'kernel'; {_LAYOUT}. Pass layers=[...] naming only "
                "such collections, in forward order."
            )
        if extra := set(coll) - {"kernel", "bias"}:
            raise ValueError(
                f"params[{name!r}] holds {sorted(extra)} besides kernel/bias, which a rescaling "
                f"does not cover; {_LAYOUT}."
            )
        shape = jnp.shape(coll["kernel"])
        if len(shape) < 2:
            raise ValueError(
                f"params[{name!r}]['kernel'] must have >= 2 axes (..., in, out), got {shape}."
            )
        num_rows, num_out = shape[-2], shape[-1]
        if "bias" in coll and jnp.shape(coll["bias"]) != (num_out,):
            raise ValueError(
                f"params[{name!r}]['bias'] must have shape ({num_out},), "
                f"got {jnp.shape(coll['bias'])}."
            )
        if not out:
            num_in = num_rows
        else:
            prev = out[-1]
            num_in = prev.num_out
            flattened = len(shape) == 2 and num_rows % num_in == 0 and prev_ndim > 2
            if num_rows != num_in and not flattened:
                raise ValueError(
                    f"params[{name!r}]['kernel'] has {num_rows} input rows, which do not match the "
                    f"{num_in} outputs of {prev.name!r} (nor a flatten of them); "
                    f"{_LAYOUT}. Check that layers lists the collections in forward order "
                    f"(in use: {names})."
                )
        channel_first = flatten == "channel_first"
        out.append(_Layer(name, "bias" in coll, num_in, num_out, num_rows, channel_first))
        prev_ndim = len(shape)
    return tuple(out)


def _segment_rows(kernel_like: jax.Array, layer: _Layer) -> jax.Array:
    """Kernel-shaped array → ``(num_in, num_out)`` sums over spatial axes and flattened rows."""
    rows = kernel_like.reshape(-1, layer.num_rows, layer.num_out).sum(axis=0)
    return jax.ops.segment_sum(rows, layer.in_units, num_segments=layer.num_in)


def _coefficients(diag: PyTree, specs: Sequence[_Layer], node: bool):
    """Per layer: kernel diagonal sums per (in unit, out unit) and bias diagonal per out unit.

    Layer granularity is the node problem with one unit per layer. Negative sums (possible
    only for the "hvp" estimate) are clipped to 0: they are treated as flat.
    """
    kernels, biases = [], []
    for layer in specs:
        K = _segment_rows(diag[layer.name]["kernel"], layer)
        b = diag[layer.name]["bias"] if layer.has_bias else None
        if not node:
            K = K.sum().reshape(1, 1)
            b = None if b is None else b.sum().reshape(1)
        kernels.append(jnp.maximum(K, 0))
        biases.append(None if b is None else jnp.maximum(b, 0))
    return kernels, biases


def _log_terms(x: jax.Array, kernels, biases) -> list:
    """Per layer, the log-terms of the objective at hidden log-scales ``x``.

    ``[(log K_ij + 2 u_{l-1,i} − 2 u_lj, log b_j − 2 u_lj or None)]`` with ``u_0 = u_L = 0``:
    a rescaling by node log-scales ``u`` divides a weight's diagonal Hessian entry by the
    square of the weight's scale.
    """
    sizes = [K.shape[1] for K in kernels[:-1]]
    u = [jnp.zeros(kernels[0].shape[0], x.dtype)]
    u += jnp.split(x, np.cumsum(sizes)[:-1]) if sizes else []
    u += [jnp.zeros(kernels[-1].shape[1], x.dtype)]
    return [
        (
            jnp.log(K) + 2 * u_in[:, None] - 2 * u_out[None, :],
            None if b is None else jnp.log(b) - 2 * u_out,
        )
        for u_in, u_out, K, b in zip(u[:-1], u[1:], kernels, biases, strict=True)
    ]


def _log_objective(x: jax.Array, kernels, biases) -> jax.Array:
    """``F = log Σ exp(terms)``: log-sum-exp of affine functions, so convex; its gradient is
    relative, so tolerances do not depend on the loss scale."""
    terms = jax.tree.leaves(_log_terms(x, kernels, biases))
    return jax.nn.logsumexp(jnp.concatenate([t.ravel() for t in terms]))


def _derivatives(x: jax.Array, kernels, biases):
    """``F``, its gradient and Hessian in closed form, without a Jacobian of the terms.

    With ``π`` the softmax weights of the terms and ``a_t`` the exponent vector of term ``t``:
    ``g = Σ π_t a_t``, ``H = Σ π_t a_t a_tᵀ − g gᵀ``. A kernel term ``(i, j)`` of layer ``l``
    has ``a = 2 e_{l-1,i} − 2 e_lj``, a bias term ``a = −2 e_lj`` (fixed input and output
    units dropped), so ``Σ π a aᵀ`` is 4 × (a diagonal of the weights touching each unit,
    minus ``P^l`` between consecutive hidden layers). Memory: the terms plus ``N × N``.
    """
    terms = _log_terms(x, kernels, biases)
    F = _log_objective(x, kernels, biases)
    weights = jax.tree.map(lambda z: jnp.exp(z - F), terms)
    into = [P.sum(axis=0) + (0 if Q is None else Q) for P, Q in weights]  # on output units
    out_of = [P.sum(axis=1) for P, _ in weights]  # on input units
    hidden = range(len(kernels) - 1)
    g = jnp.concatenate([2 * (out_of[h + 1] - into[h]) for h in hidden])
    H = jnp.diag(jnp.concatenate([4 * (out_of[h + 1] + into[h]) for h in hidden]))
    offsets = np.cumsum([0] + [K.shape[1] for K in kernels[:-1]])
    for h in hidden[1:]:  # layer h joins hidden groups h-1 and h
        block = -4 * weights[h][0]
        rows, cols = slice(offsets[h - 1], offsets[h]), slice(offsets[h], offsets[h + 1])
        H = H.at[rows, cols].set(block).at[cols, rows].set(block.T)
    return F, g, H - jnp.outer(g, g)


_HALVINGS = 0.5 ** np.arange(40)


def _newton(F: Callable, derivatives: Callable, x0: jax.Array, tol, max_iterations):
    """Damped Newton with Armijo backtracking, until the decrement ``gᵀH⁻¹g/2 ≤ tol``.

    For ``F = log f`` the decrement estimates ``F − F*``, i.e. the relative error of ``f``.
    Stops early when a step no longer decreases ``F`` (floating-point floor).
    """
    eye = jnp.eye(x0.size, dtype=x0.dtype)
    damping = jnp.sqrt(jnp.finfo(x0.dtype).eps)

    def cond(state):
        _, decrement, it, stalled = state
        return (decrement > tol) & (it < max_iterations) & ~stalled

    def body(state):
        x, _, it, _ = state
        fx, g, H = derivatives(x)
        # Directions of (near-)zero curvature occur when a unit or layer has no curvature at
        # all; the relative damping keeps the step finite there.
        p = jnp.linalg.solve(H + damping * (1 + jnp.max(jnp.diag(H))) * eye, g)
        decrement = g @ p / 2
        # Armijo backtracking over all halvings at once: cheaper to compile than a nested loop.
        steps = jnp.asarray(_HALVINGS, x.dtype)
        values = jax.vmap(lambda t: F(x - t * p))(steps)
        accepted = values <= fx - 1e-4 * steps * 2 * decrement
        first = jnp.argmax(accepted)
        stalled = ~accepted[first] | ~(values[first] < fx)
        return jnp.where(stalled, x, x - steps[first] * p), decrement, it + 1, stalled

    inf = jnp.asarray(jnp.inf, x0.dtype)
    x, _, steps, _ = jax.lax.while_loop(cond, body, (x0, inf, 0, jnp.asarray(False)))
    return x, F(x), steps


def _solve(kernels, biases, tol, max_iterations):
    """Minimise the log-objective over the hidden log-scales, from the given network (0)."""
    x0 = jnp.zeros(sum(K.shape[1] for K in kernels[:-1]), kernels[0].dtype)
    F = partial(_log_objective, kernels=kernels, biases=biases)
    if not x0.size:
        return x0, F(x0), jnp.asarray(0)
    derivatives = partial(_derivatives, kernels=kernels, biases=biases)
    return _newton(F, derivatives, x0, tol, max_iterations)


def minimum_sharpness(
    logits_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    batch: tuple[jax.Array, jax.Array] | Iterable[tuple[jax.Array, jax.Array]],
    layers: Sequence[str] | None = None,
    granularity: str = "layer",
    method: str = "exact",
    tol: float = 1e-10,
    key: jax.Array | None = None,
    num_samples: int = 100,
    max_iterations: int = 100,
    *,
    flatten: str = "channel_last",
    diagonal: PyTree | None = None,
    check: bool = True,
) -> MinimumSharpnessResult:
    """Minimum Sharpness: the Hessian trace minimised over function-preserving rescalings.

    Ibayashi, Hamaguchi & Imaizumi, "Minimum sharpness: scale-invariant parameter-robustness
    of neural networks", arXiv 2106.12612 (code: ibayashi-hikaru/minimum-sharpness). For a
    ReLU network with layers ``l = 1..L``, rescaling ``W_l → α_l W_l``,
    ``b_l → (Π_{m≤l} α_m) b_l`` with ``Π_l α_l = 1`` preserves the function and divides each
    block's Hessian diagonal by the square of its scale, so with block traces ``T_W^l, T_b^l``

        MinSharp = min_{α>0} Σ_{l<L} [T_W^l/α_l² + T_b^l/(Π_{m≤l} α_m)²]
                             + T_W^L (Π_{l<L} α_l)² + T_b^L,

    a sum of exponentials of linear functions of ``s = log α`` (variables ``s_1..s_{L-1}``):
    convex. It is solved to tolerance with damped Newton on ``log`` of the objective. Without
    biases its value is ``L · (Π_l T_W^l)^{1/L}`` (AM-GM).

    ``granularity="node"`` uses the finer equivalence of the paper: each hidden unit (a Dense
    column or a conv output channel) has its own scale ``a`` (incoming weights and bias times
    ``a``, outgoing weights divided by ``a``). The objective
    ``Σ_l Σ_ij D^l_ij a_{l-1,i}²/a_lj² + Σ_j B^l_j / a_lj²`` (``D^l`` the kernel diagonal summed
    over spatial positions, ``B^l`` the bias diagonal) is again convex in ``log a``, and since
    node rescalings contain layer rescalings, node-wise ≤ layer-wise.

    Assumptions: ``layers`` form a feed-forward chain (no skip connections, no normalisation
    layers) with positively homogeneous activations (ReLU, leaky ReLU, max-pool); a Dense
    after a conv reads the feature map flattened as ``flatten`` says. Output units are not
    rescaled.

    The assumptions are checked, not trusted: after solving, the optimal rescaling is applied
    and the logits compared on the first batch's first 256 examples. A relative change
    (``output_change``, over the largest logit) above ``√ε`` of the least precise of the
    layers' parameters and the logits (3.5e-4 in float32, 1.5e-8 in float64) raises a
    ``ValueError`` naming the likely cause. A valid rescaling changes the logits only by
    rounding, ≲ (operations per logit) · ε relative to the terms summed, far below ``√ε`` for
    practical depths and widths; a broken assumption changes them by O(1) (a wrong layer
    order, a residual or tanh network, a channel-first flatten read channel-last). For a
    network that is not rescaling-invariant Minimum Sharpness is undefined: report the plain
    trace (``result.trace`` with ``check=False``, or :func:`hessian_trace`). Inside
    ``jax.jit`` nothing can be raised: read ``result.output_change`` instead.

    Args:
      logits_fn: ``logits_fn(params, x) -> logits`` ``(n, K)``; the loss is mean softmax
        cross-entropy.
      params: dict of layer collections, each ``{'kernel': (..., in, out), 'bias': (out,)}``
        (flax ``variables['params']``).
      batch: ``(x, y)`` with integer labels, or an iterable of such tuples (accumulated).
      layers: collection names in forward order; default: all of ``params``, in their order
        when each family is numbered increasingly (flax's definition order ``Conv_0, Dense_0,
        Dense_1``), else by numeric suffix (a ``jax.tree.map`` or optax update sorts keys as
        strings, ``Dense_10`` before ``Dense_2``). Pass it whenever the names do not tell
        the order.
      granularity: ``"layer"`` (default, the paper's) or ``"node"``.
      method: block traces from the ``"exact"`` Hessian diagonal (default; exact for
        piecewise-linear nets) or its ``"hvp"`` (Hutchinson) estimate.
      tol: Newton decrement tolerance, ≈ the relative error of ``value`` (default 1e-10; in
        float32 the solver stops at the rounding floor).
      key: PRNG key, required for ``method="hvp"``.
      num_samples: Hutchinson probes for ``method="hvp"`` (default 100).
      max_iterations: cap on Newton steps (default 100).
      flatten: how a Dense after a conv reads the flattened feature map: ``"channel_last"``
        (default; NHWC, ``x.reshape(n, -1)``: row ``r`` is channel ``r mod C``) or
        ``"channel_first"`` (NCHW: row ``r`` is channel ``r // (H·W)``). Matters only for
        ``granularity="node"``.
      diagonal: a Hessian diagonal of ``params`` already computed by :func:`hessian_diagonal`
        on ``batch`` (e.g. to get both granularities from one diagonal, which dominates the
        cost); default: computed here with ``method``, ``key`` and ``num_samples``.
      check: raise when the rescaling does not preserve the logits (default ``True``).

    Returns:
      A :class:`MinimumSharpnessResult`; :func:`apply_scales` turns it into parameters.
    """
    choice("granularity", granularity, ("layer", "node"))
    choice("method", method, ("exact", "hvp"))
    positive_int("max_iterations", max_iterations)
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}.")
    specs = _layers(params, layers, flatten)
    x_check, batch = _first_inputs(batch)
    if diagonal is None:
        diagonal = hessian_diagonal(logits_fn, params, batch, method, key, num_samples)
    elif jax.tree.structure(diagonal) != jax.tree.structure(params) or any(
        jnp.shape(d) != jnp.shape(p)
        for d, p in zip(jax.tree.leaves(diagonal), jax.tree.leaves(params), strict=True)
    ):
        raise ValueError(
            "diagonal must have the structure and shapes of params; pass "
            "sharpness.hessian_diagonal(logits_fn, params, batch)."
        )
    result = _minimise(diagonal, tol, max_iterations, specs=specs, node=granularity == "node")
    if is_tracing(params, x_check, result.log_scales):
        change = _output_change(logits_fn, params, result.log_scales, x_check, specs=specs)
    else:  # keyed on logits_fn as traced now, never stale
        program, consts = trace(logits_fn, params, x_check)
        change = _output_change_jit(program, consts, params, result.log_scales, x_check, specs)
    result = result._replace(output_change=change)
    if check and not isinstance(change, jax.core.Tracer):
        # Rounding comes from the least precise of the rescaled weights and the logits.
        leaves = [change, *jax.tree.leaves([params[layer.name] for layer in specs])]
        eps = max(float(jnp.finfo(jnp.result_type(leaf)).eps) for leaf in leaves)
        _check_invariance(float(change), eps, specs, flatten, granularity, layers)
    return result


# Examples on which the rescaled network's logits are compared: two forward passes, small
# beside the diagonal (K backward passes per example of the whole batch).
CHECK_EXAMPLES = 256


def _first_inputs(batch: Any) -> tuple[jax.Array, Any]:
    """The first batch's first inputs, and the batches (re-chained if an iterator)."""
    batches = labelled_batches(batch)
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("batch is an empty iterable; pass at least one (x, y) batch.")
    if iterator is batches:  # a one-shot iterator: put the first batch back
        batches = itertools.chain([first], iterator)
    x, _ = check_labelled_batch(first)
    return x[:CHECK_EXAMPLES], batches


def _output_change(logits_fn: Callable, params: PyTree, log_scales, x: jax.Array, *, specs):
    before = logits_fn(params, x)
    after = logits_fn(_rescale(params, log_scales, specs=specs), x)
    scale = jnp.max(jnp.abs(before))
    return jnp.max(jnp.abs(after - before)) / jnp.where(scale > 0, scale, 1)


@partial(jax.jit, static_argnums=(0, 5))
def _output_change_jit(program: Program, consts: list, params, log_scales, x, specs):
    return _output_change(program.bind(consts), params, log_scales, x, specs=specs)


def _check_invariance(change: float, eps: float, specs, flatten, granularity, layers) -> None:
    limit = float(np.sqrt(eps))
    if change <= limit:  # NaN (a non-finite network) fails too
        return
    causes = [
        f"the layers are not in forward order (in use: {[s.name for s in specs]}); pass "
        "layers=[...] in forward order"
        + (" (the default orders them by numeric suffix)" if layers is None else ""),
        "the network is not invariant under rescaling (residual connections, normalisation, "
        "tanh/sigmoid/GELU activations): Minimum Sharpness is undefined for it; report the "
        "plain trace instead (result.trace with check=False, or sharpness.hessian_trace)",
    ]
    flattened = any(s.num_rows != s.num_in for s in specs)
    if granularity == "node" and flattened:
        other = _FLATTEN[1 - _FLATTEN.index(flatten)]
        causes.insert(
            0,
            f"a Dense reads the conv features flattened {other.replace('_', '-')}; "
            f"pass flatten={other!r}",
        )
    raise ValueError(
        f"minimum_sharpness: the optimal rescaling changes the logits by {change:.3g} of their "
        f"largest value (rounding allows {limit:.2g}), so the network is not the feed-forward, "
        "positively homogeneous chain this measure assumes and the value would be wrong. "
        "Likely causes: " + "; or ".join(causes) + ". Pass check=False to get the result "
        "anyway (result.output_change holds the change)."
    )


@partial(jax.jit, static_argnames=("specs", "node"))
def _minimise(diag, tol, max_iterations, *, specs, node) -> MinimumSharpnessResult:
    kernels, biases = _coefficients(diag, specs, node)
    trace = sum(jnp.sum(leaf) for layer in specs for leaf in jax.tree.leaves(diag[layer.name]))
    x, log_value, steps = _solve(kernels, biases, tol, max_iterations)
    hidden = tuple(jnp.split(x, np.cumsum([K.shape[1] for K in kernels[:-1]])[:-1]))
    if node:
        log_scales = hidden if kernels[:-1] else ()
    else:
        log_scales = jnp.diff(jnp.concatenate([jnp.zeros(1, x.dtype), x, jnp.zeros(1, x.dtype)]))
    return MinimumSharpnessResult(jnp.exp(log_value), trace, log_scales, steps)


def apply_scales(
    params: PyTree,
    result: MinimumSharpnessResult,
    layers: Sequence[str] | None = None,
    *,
    flatten: str = "channel_last",
) -> PyTree:
    """The function-equivalent parameters at which the trace equals ``result.value``.

    Kernel entry ``(i, j)`` of layer ``l`` is multiplied by ``a_lj / a_{l-1,i}`` and bias
    ``j`` by ``a_lj``, where the node scales are ``a_lj = Π_{m≤l} α_m`` for a layer-wise result.
    ``layers`` and ``flatten`` must be the values passed to :func:`minimum_sharpness`. Other
    collections are left unchanged.
    """
    specs = _layers(params, layers, flatten)
    log_scales = result.log_scales
    if isinstance(log_scales, tuple):
        expected = [layer.num_out for layer in specs[:-1]]
        if [h.shape[0] for h in log_scales] != expected:
            raise ValueError(
                f"result has node scales for {[h.shape[0] for h in log_scales]} units, but "
                f"layers have {expected} hidden units; pass the params/layers given to "
                "minimum_sharpness."
            )
    elif log_scales.shape != (len(specs),):
        raise ValueError(
            f"result has {log_scales.shape[0]} layer scales, but {len(specs)} layers were "
            "given; pass the same layers as to minimum_sharpness."
        )
    return _rescale(params, log_scales, specs=specs)


@partial(jax.jit, static_argnames="specs")
def _rescale(params: PyTree, log_scales, *, specs: tuple[_Layer, ...]) -> PyTree:
    if isinstance(log_scales, tuple):
        hidden = list(log_scales)
    else:  # layer-wise: every unit of hidden layer l has log-scale Σ_{m≤l} s_m
        cumulative = jnp.cumsum(log_scales)
        hidden = [
            jnp.full(layer.num_out, c) for c, layer in zip(cumulative[:-1], specs[:-1], strict=True)
        ]
    u = [jnp.zeros(specs[0].num_in), *hidden, jnp.zeros(specs[-1].num_out)]
    out = dict(params)
    for u_in, u_out, layer in zip(u[:-1], u[1:], specs, strict=True):
        coll = dict(params[layer.name])
        kernel = coll["kernel"]
        factor = jnp.exp(u_out[None, :] - u_in[layer.in_units][:, None])
        coll["kernel"] = kernel * factor.astype(kernel.dtype)
        if layer.has_bias:
            coll["bias"] = coll["bias"] * jnp.exp(u_out).astype(coll["bias"].dtype)
        out[layer.name] = coll
    return out
