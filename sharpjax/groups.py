"""Parameter groups: perturb only some parameters, each group with its own ρ, for every rule.

Parameters are labelled the way ``optax.multi_transform`` labels them: a pytree of labels
with the params' structure, or a function ``params -> labels``. A label is a Python value
(a string, an int, ``True``); ``None`` or ``False`` leaves that parameter unperturbed
(``ε = 0`` there, its gradient still the second gradient's). :func:`path_labels` builds the
function from a predicate over the parameter paths, and the presets cover the common cases::

    sharpjax.sam(0.5, groups=sharpjax.sam_on())                # normalisation layers only
    sharpjax.sam(0.05, groups=sharpjax.param_groups(sharpjax.no_bias_or_norm()))
    sharpjax.sam(0.05, groups=sharpjax.param_groups(labels, rho_scale={"body": 1.0,
                                                                    "head": 0.2}))

Norm semantics (``norm=``), for a rule ``R(g, w, ρ)`` (SAM's is ``ρ g/‖g‖``), S the
perturbed parameters, ``s_k`` the ρ scale of group k:

* ``"joint"`` (default): the rule sees the perturbed parameters as one vector, so every norm
  runs over S only, and group k gets ``ε_k = s_k [R(g_S, w_S, ρ)]_k``; for SAM
  ``ε_k = s_k ρ g_k / ‖g_S‖``. With one group this is SAM-ON (Müller, Vlaar, Rolnick & Hein,
  *Normalization Layers Are All That Sharpness-Aware Minimization Needs*, NeurIPS 2023),
  which normalises ε over the perturbed (normalisation-layer) parameters only.
* ``"group"``: the rule runs on each group alone, with its own state and radius
  ``s_k ρ``: ``ε_k = R(g_k, w_k, s_k ρ)``; for SAM ``ε_k = s_k ρ g_k / ‖g_k‖``, so every group
  is perturbed by exactly ``s_k ρ``. With one group per layer (:func:`layerwise`) this is
  layer-wise SAM, the normalisation that µP² (Haas, Xu, Cevher & Vankadara, *µP²: Effective
  Sharpness Aware Minimization Requires Layerwise Perturbation Scaling*, NeurIPS 2024) builds
  its layer-wise ρ scaling on (:func:`mup2`).

ρ itself stays the transformation's (a float, a schedule, ``inject_hyperparams``); the groups
scale it by constants. Stateful rules (VaSSO's ``d``) keep state for the perturbed parameters
only. The diagnostics are the rule's: in ``"group"`` mode a ``*_norm`` diagnostic is the norm
over all groups (the root of the sum of the groups' squares), any other the mean over groups.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sharpjax.core import PerturbationRule, check_scalar_or_schedule, compute_dtype

__all__ = [
    "NORM_LAYER_PATTERN",
    "ParamGroups",
    "grouped_perturbation",
    "layerwise",
    "mup2",
    "no_bias_or_norm",
    "normalization_layers",
    "param_groups",
    "path_labels",
    "resolve_labels",
    "sam_on",
]

NORMS = ("joint", "group")

# A path component naming a normalisation module: flax's BatchNorm_0 / LayerNorm_0 /
# GroupNorm_0 / RMSNorm_0 (every sharpjax model's BatchNorm is named so), and the usual
# hand-given names (norm1, bn1, ln_f).
NORM_LAYER_PATTERN = r"(?i)(norm|^bn(_?\d+)?$|^ln(_?[a-z0-9]+)?$)"

Labels = Any  # a pytree of labels with the params' structure, or params -> such a pytree


def _path_keys(path: tuple) -> list[str]:
    """The names along a pytree path (dict keys, attribute names, sequence indices)."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return names


def path_labels(fn: Callable[[str, Any], Hashable]) -> Callable[[Any], Any]:
    """Labels from a function of each parameter's path: ``fn(path, leaf) -> label``.

    ``path`` is the names along the pytree joined by ``/`` (``"Dense_0/kernel"``,
    ``"BasicBlock_0/BatchNorm_1/scale"``). A predicate works as is: ``True`` perturbs,
    ``False`` does not::

        sharpjax.param_groups(sharpjax.path_labels(lambda path, _: "head" not in path))
    """

    def labels(params):
        def one(path, leaf):
            return fn("/".join(_path_keys(path)), leaf)

        return jax.tree_util.tree_map_with_path(one, params)

    return labels


def normalization_layers(pattern: str = NORM_LAYER_PATTERN) -> Callable[[Any], Any]:
    """Labels: ``True`` for the parameters of normalisation layers (their ``scale`` and
    ``bias``), ``False`` elsewhere. A layer counts as one when a path component matches
    ``pattern`` (default: ``norm`` anywhere in the name, or ``bn``/``ln`` names)."""
    regex = re.compile(pattern)
    return path_labels(lambda path, _: any(regex.search(p) for p in path.split("/")[:-1]))


def no_bias_or_norm(pattern: str = NORM_LAYER_PATTERN) -> Callable[[Any], Any]:
    """Labels: ``False`` for biases and normalisation layers, ``True`` for the rest (the
    parameters weight decay usually applies to)."""
    regex = re.compile(pattern)

    def label(path, _):
        parts = path.split("/")
        return not (parts[-1] == "bias" or any(regex.search(p) for p in parts[:-1]))

    return path_labels(label)


def layerwise() -> Callable[[Any], Any]:
    """Labels: one group per layer, the path of the module that holds the leaf (a Dense
    layer's kernel and bias share one). With ``norm="group"``: layer-wise SAM."""
    return path_labels(lambda path, _: "/".join(path.split("/")[:-1]) or path)


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Which parameters a rule perturbs and with which ρ (see :func:`param_groups`)."""

    labels: Labels
    rho_scale: Mapping[Hashable, float] | Callable[[Any], Mapping[Hashable, float]] | None
    norm: str = "joint"


def param_groups(
    labels: Labels,
    *,
    rho_scale: Mapping[Hashable, float] | Callable[[Any], Mapping[Hashable, float]] | None = None,
    norm: str = "joint",
) -> ParamGroups:
    """Parameter groups for any sharpjax rule (the ``groups=`` keyword of the constructors).

    Args:
      labels: a pytree with the params' structure whose leaves are labels, or a function
        ``params -> labels`` (:func:`path_labels`, :func:`normalization_layers`,
        :func:`no_bias_or_norm`, :func:`layerwise`). ``None``/``False``: not perturbed.
      rho_scale: group k's radius is ``rho_scale[k] · ρ`` (a finite float ≥ 0). ``None``:
        1 for every group. If given, it must name every label that perturbs (and only those);
        it may also be a function ``params -> dict`` (as :func:`mup2` uses).
      norm: ``"joint"`` (the rule's norms over all perturbed parameters at once: SAM-ON) or
        ``"group"`` (over each group alone: layer-wise SAM). See the module docstring.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    if rho_scale is not None and not callable(rho_scale):
        if not isinstance(rho_scale, Mapping):
            raise TypeError(
                "rho_scale must be a dict {label: scale of ρ} (or a function params -> dict), "
                f"got {type(rho_scale).__name__}."
            )
        _check_scales(rho_scale)
    if not callable(labels):
        _check_label_values(labels)
    return ParamGroups(labels, rho_scale, norm)


def _check_scales(scales: Mapping[Hashable, float]) -> None:
    for label, scale in scales.items():
        if callable(scale):
            raise TypeError(
                f"rho_scale[{label!r}] must be a number: a group scales the transformation's ρ "
                "by a constant; give the transformation a ρ schedule instead."
            )
        check_scalar_or_schedule(f"rho_scale[{label!r}]", scale, 0.0)


def _is_label_leaf(x: Any) -> bool:
    return x is None


def _check_label_values(tree: Any) -> None:
    for path, label in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_label_leaf):
        try:
            hash(label)
        except TypeError:
            raise TypeError(
                f"labels{jax.tree_util.keystr(path)} is a {type(label).__name__}; a label must "
                "be a hashable Python value (a str, an int, True; None or False to leave the "
                "parameter unperturbed)."
            ) from None
        if isinstance(label, jax.Array):
            raise TypeError(
                f"labels{jax.tree_util.keystr(path)} is an array; a label must be a Python value "
                "(a str, an int, True; None or False to leave the parameter unperturbed)."
            )


def resolve_labels(labels: Labels, params: Any) -> list[Hashable]:
    """The label of every leaf of ``params``, in ``jax.tree.leaves`` order.

    Raises a ValueError naming ``labels`` when its paths are not the params'.
    """
    tree = labels(params) if callable(labels) else labels
    _check_label_values(tree)
    param_items = jax.tree_util.tree_leaves_with_path(params)
    label_items = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_label_leaf)
    param_paths = ["/".join(_path_keys(p)) for p, _ in param_items]
    label_paths = ["/".join(_path_keys(p)) for p, _ in label_items]
    if param_paths != label_paths:
        missing = [p for p in param_paths if p not in set(label_paths)]
        extra = [p for p in label_paths if p not in set(param_paths)]
        raise ValueError(
            "labels must have the params' structure (one label per parameter leaf); "
            f"params without a label: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"labels without a parameter: {extra[:5]}{' ...' if len(extra) > 5 else ''}. "
            "Build them from the params, e.g. jax.tree.map(lambda _: 'all', params), or pass a "
            "function params -> labels (sharpjax.path_labels)."
        )
    return [label for _, label in label_items]


def _perturbs(label: Hashable) -> bool:
    return label is not None and label is not False


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The groups of one params structure: label and leaf indices of each, and the scales."""

    names: tuple[Hashable, ...]
    indices: tuple[tuple[int, ...], ...]
    scales: tuple[float, ...]
    num_leaves: int


def _plan(groups: ParamGroups, params: Any) -> _Plan:
    labels = resolve_labels(groups.labels, params)
    names: list[Hashable] = []
    for label in labels:
        if _perturbs(label) and label not in names:
            names.append(label)
    if not names:
        raise ValueError(
            "labels perturb no parameter (every label is None or False); label at least one "
            "parameter, or use the base optimizer without a sharpness-aware transformation."
        )
    scales = groups.rho_scale(params) if callable(groups.rho_scale) else groups.rho_scale
    if scales is None:
        scales = {name: 1.0 for name in names}
    else:
        _check_scales(scales)
        unscaled = [n for n in names if n not in scales]
        if unscaled:
            raise ValueError(
                f"rho_scale gives no ρ scale for the group(s) {unscaled}; add them to rho_scale "
                "(e.g. rho_scale={..., " + f"{unscaled[0]!r}: 1.0" + "}), or label those "
                "parameters None to leave them unperturbed."
            )
        unused = [k for k in scales if k not in names]
        if unused:
            raise ValueError(
                f"rho_scale names the group(s) {unused}, which no parameter is labelled with "
                f"(the perturbing labels are {names}); fix the label or drop the entry."
            )
    indices = tuple(tuple(i for i, lab in enumerate(labels) if lab == name) for name in names)
    return _Plan(
        tuple(names), indices, tuple(float(scales[n]) for n in names), num_leaves=len(labels)
    )


def _combine_diagnostics(diags: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    out = {}
    for key in diags[0]:
        values = jnp.stack([jnp.asarray(d[key], jnp.float32) for d in diags])
        if key.endswith("_norm"):  # the groups are disjoint: norms add in squares
            out[key] = jnp.sqrt(jnp.sum(jnp.square(values)))
        else:
            out[key] = jnp.mean(values)
    return out


def grouped_perturbation(rule: PerturbationRule, groups: ParamGroups) -> PerturbationRule:
    """``rule`` restricted to the perturbed parameters of ``groups``, with their ρ scales.

    Equations in this module's docstring; ε is exactly zero on unperturbed parameters.
    """
    if not isinstance(groups, ParamGroups):
        raise TypeError(
            f"groups must be built with sharpjax.param_groups(labels, ...), got "
            f"{type(groups).__name__}."
        )
    joint = groups.norm == "joint"

    def pick(leaves, idx):
        return [leaves[i] for i in idx]

    def init(params):
        plan = _plan(groups, params)
        leaves = jax.tree.leaves(params)
        if joint:
            return rule.init(pick(leaves, sum(plan.indices, ())))
        return tuple(rule.init(pick(leaves, idx)) for idx in plan.indices)

    def scaled(e, s, w):
        if s == 1.0:
            return e.astype(w.dtype)
        return (e.astype(compute_dtype(e)) * s).astype(w.dtype)

    def perturb(g, params, state, rho):
        plan = _plan(groups, params)
        p_leaves, treedef = jax.tree.flatten(params)
        g_leaves = jax.tree.leaves(g)
        eps: list[Any] = [None] * plan.num_leaves
        if joint:
            idx = sum(plan.indices, ())
            sub, state, diag = rule.perturb(pick(g_leaves, idx), pick(p_leaves, idx), state, rho)
            scale_of = {i: s for ids, s in zip(plan.indices, plan.scales, strict=True) for i in ids}
            for i, e in zip(idx, sub, strict=True):
                eps[i] = scaled(e, scale_of[i], p_leaves[i])
            if any(s != 1.0 for s in plan.scales):
                diag = {k: v for k, v in diag.items() if k != "perturbation_norm"}
        else:
            states, diags = [], []
            for idx, s, st in zip(plan.indices, plan.scales, state, strict=True):
                sub, st, d = rule.perturb(pick(g_leaves, idx), pick(p_leaves, idx), st, rho * s)
                for i, e in zip(idx, sub, strict=True):
                    eps[i] = e.astype(p_leaves[i].dtype)
                states.append(st)
                diags.append(d)
            state = tuple(states)
            keys = set.intersection(*(set(d) for d in diags))
            diag = _combine_diagnostics([{k: d[k] for k in sorted(keys)} for d in diags])
        eps = [jnp.zeros_like(w) if e is None else e for e, w in zip(eps, p_leaves, strict=True)]
        return jax.tree.unflatten(treedef, eps), state, diag

    return PerturbationRule(init, perturb, rule.diagnostics)


def sam_on(pattern: str = NORM_LAYER_PATTERN) -> ParamGroups:
    """SAM-ON (Müller et al., NeurIPS 2023): perturb the normalisation layers only, ε
    normalised over them (``norm="joint"``). The paper's ρ is about 10× SAM's (e.g. 0.5 to 1
    for a ResNet on CIFAR where SAM uses 0.05 to 0.1): tune it, SAM's ρ is far too small."""
    return param_groups(normalization_layers(pattern), norm="joint")


def _fans(leaf: Any) -> tuple[int, int]:
    shape = jnp.shape(leaf)
    if len(shape) < 2:  # a bias or a normalisation scale: a map from one input to n outputs
        return 1, int(math.prod(shape)) if shape else 1
    # flax kernels put the output features last: Dense (in, out), Conv (kh, kw, in, out)
    return int(math.prod(shape[:-1])), int(shape[-1])


def mup2(include_vectors: bool = True) -> ParamGroups:
    """Layer-wise ρ scaling by µP²'s spectral perturbation condition (Haas et al., NeurIPS 2024).

    What is implemented (the paper's full parameterisation tables, which also fix the
    initialisation and learning rates by width, could not be read for this library): the
    condition that the paper states for deriving layer-wise perturbation scalings, that a
    layer's perturbation should scale like its µP update, spectral norm
    ``‖ε_l‖_* ∝ ρ √(fan_out / fan_in)``. Each parameter leaf is its own group with the
    per-group norm (``norm="group"``) and scale ``s_l = √(fan_out/fan_in)``, so
    ``ε_l = ρ s_l g_l/‖g_l‖`` has Frobenius norm exactly ``ρ s_l`` (and spectral norm
    ``ρ s_l`` when ``g_l`` is rank one, ≤ otherwise). Kernels take fan_in as the product of
    all but the last axis (flax's layout); vectors (biases, normalisation scales) count as
    fan_in 1, ``s = √n``; ``include_vectors=False`` leaves them unperturbed.
    """

    def labels(params):
        def one(path, leaf):
            if not include_vectors and jnp.ndim(leaf) < 2:
                return None
            return "/".join(_path_keys(path))

        return jax.tree_util.tree_map_with_path(one, params)

    def scales(params):
        out = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            if not include_vectors and jnp.ndim(leaf) < 2:
                continue
            fan_in, fan_out = _fans(leaf)
            out["/".join(_path_keys(path))] = math.sqrt(fan_out / fan_in)
        return out

    return param_groups(labels, rho_scale=scales, norm="group")
