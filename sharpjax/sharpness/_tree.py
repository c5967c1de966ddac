"""Parameter-sized vectors kept in the parameters' own pytree layout (and sharding).

Every vector the measures build from ``params`` (Lanczos bases, probes, directions,
perturbations) is a pytree shaped like ``params``, and a set of ``m`` of them is a *stacked*
pytree: each leaf gains a leading axis of size ``m``. Nothing is raveled into one flat vector,
whose layout XLA would choose on its own: on params sharded over a mesh, a flat Lanczos basis
came back split along another axis than the params, and every product reshuffled it between
devices. Kept in the params' layout, each leaf of a vector (or of a stack, whose leading axis is
never split) is sharded as its parameter is, so the memory per device falls with the shard
count. :class:`Layout` records the params' shardings outside any trace and re-imposes them
(``jax.lax.with_sharding_constraint``) where XLA would not infer them, e.g. on fresh zeros or
random probes.

Inner products sum elementwise products leaf by leaf (``jnp.sum(x * y)``, never ``vdot``, which
ravels the leaf first) in at least float32.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from sharpjax.core import compute_dtype, tree_norm

PyTree = Any

__all__ = [
    "Layout",
    "combine",
    "dot",
    "gaussian",
    "norm",
    "orthonormal_rows",
    "orthonormalise",
    "pairwise_dots",
    "rademacher",
    "row",
    "sharded_gaussian",
    "size",
    "stacked_dots",
    "stacked_dots_rows",
]

norm = tree_norm


def size(params: PyTree) -> int:
    """Number of scalar parameters."""
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(params))


def _dtype(*trees: PyTree) -> jnp.dtype:
    return jnp.result_type(*(compute_dtype(x) for t in trees for x in jax.tree.leaves(t)))


def dot(a: PyTree, b: PyTree) -> jax.Array:
    """``⟨a, b⟩`` of two pytrees of the same structure."""
    dtype = _dtype(a, b)
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(jnp.sum(x.astype(dtype) * y.astype(dtype)) for x, y in pairs)


def stacked_dots(V: PyTree, w: PyTree) -> jax.Array:
    """``(⟨V_i, w⟩)_i`` for a stack ``V`` (leading axis ``m``) and a vector ``w``: shape (m,)."""
    dtype = _dtype(V, w)
    pairs = zip(jax.tree.leaves(V), jax.tree.leaves(w), strict=True)
    return sum(
        jnp.sum(v.astype(dtype) * x.astype(dtype), axis=tuple(range(1, v.ndim))) for v, x in pairs
    )


def stacked_dots_rows(A: PyTree, B: PyTree) -> jax.Array:
    """``(⟨A_i, B_i⟩)_i`` for two stacks of the same length: shape (m,)."""
    dtype = _dtype(A, B)
    pairs = zip(jax.tree.leaves(A), jax.tree.leaves(B), strict=True)
    return sum(
        jnp.sum(a.astype(dtype) * b.astype(dtype), axis=tuple(range(1, a.ndim))) for a, b in pairs
    )


def pairwise_dots(A: PyTree, B: PyTree) -> jax.Array:
    """``(⟨A_i, B_j⟩)_ij`` for two stacks: shape (len(A), len(B))."""
    dtype = _dtype(A, B)
    pairs = zip(jax.tree.leaves(A), jax.tree.leaves(B), strict=True)
    return sum(
        jnp.tensordot(a.astype(dtype), b.astype(dtype), (tuple(range(1, a.ndim)),) * 2)
        for a, b in pairs
    )


def combine(c: jax.Array, V: PyTree) -> PyTree:
    """``Σ_i c_i V_i`` (``c`` of shape (m,)), or the stack ``(Σ_i C_ji V_i)_j`` for ``C`` (n, m)."""
    return jax.tree.map(lambda v: jnp.tensordot(c.astype(v.dtype), v, 1), V)


def orthonormalise(w: PyTree, V: PyTree) -> PyTree:
    """``w`` minus its projection on the rows of the stack ``V`` (orthonormal or zero rows).

    Twice ("twice is enough", Parlett): one Gram-Schmidt pass loses orthogonality in floating
    point once ``w`` has mostly been cancelled.
    """
    for _ in range(2):
        w = jax.tree.map(jnp.subtract, w, combine(stacked_dots(V, w), V))
    return w


def orthonormal_rows(Y: PyTree) -> PyTree:
    """An orthonormal basis of the span of the stack ``Y``'s rows, as a stack of the same
    length: Gram-Schmidt, each row reorthogonalised twice. A row numerically in the span of the
    previous ones (norm left below ``10 d ε`` of its own) becomes zero, so the rows stay
    orthonormal (or zero) when ``Y`` is rank-deficient, as ``jnp.linalg.qr``'s ``Q`` would."""
    m = jax.tree.leaves(Y)[0].shape[0]
    dtype = _dtype(Y)
    tol = 10 * size(row(Y, 0)) * jnp.finfo(dtype).eps

    def body(i, Q):
        y = row(Y, i)
        w = orthonormalise(y, Q)
        n = norm(w)
        keep = n > tol * norm(y)
        q = jax.tree.map(lambda x: jnp.where(keep, x / jnp.where(keep, n, 1), 0), w)
        return jax.tree.map(lambda a, x: a.at[i].set(x.astype(a.dtype)), Q, q)

    return jax.lax.fori_loop(0, m, body, jax.tree.map(jnp.zeros_like, Y))


def row(V: PyTree, i: Any) -> PyTree:
    """The ``i``-th vector of a stack."""
    return jax.tree.map(lambda v: v[i], V)


def _draw(sample: Callable, key: jax.Array, params: PyTree, shape: tuple[int, ...]) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [
        sample(k, (*shape, *jnp.shape(x)), jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def gaussian(key: jax.Array, params: PyTree, shape: tuple[int, ...] = ()) -> PyTree:
    """Standard normal vectors shaped like ``params`` (a stack of ``shape`` of them)."""
    return _draw(jax.random.normal, key, params, shape)


def rademacher(key: jax.Array, params: PyTree, shape: tuple[int, ...] = ()) -> PyTree:
    """±1 vectors shaped like ``params`` (a stack of ``shape`` of them)."""
    return _draw(jax.random.rademacher, key, params, shape)


@partial(jax.jit, static_argnums=(1, 2))
def _gaussian_in_layout(key: jax.Array, shapes: Any, layout: Layout) -> PyTree:
    return layout.vector(gaussian(key, jax.tree.unflatten(shapes[0], list(shapes[1]))))


def sharded_gaussian(key: jax.Array, params: PyTree) -> PyTree:
    """:func:`gaussian` drawn directly in the params' sharding, never whole on one device."""
    layout = Layout(params)
    if not any(s is not None for s in layout.shardings):
        return gaussian(key, params)
    leaves, treedef = jax.tree.flatten(params)
    shapes = (treedef, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves))
    return _gaussian_in_layout(key, shapes, layout)


def _named(leaf: Any) -> NamedSharding | None:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(leaf, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
        return None
    return sharding


class Layout:
    """The params' shardings, read from concrete params, to impose on vectors and stacks.

    Hashable (a static jit argument): each leaf's ``NamedSharding``, or ``None`` for a leaf
    that is not on a named mesh (one device, or traced inside the caller's jit, where XLA
    propagates the params' layout and the caller's own constraints apply).
    """

    __slots__ = ("_key", "names", "shardings")

    def __init__(self, params: PyTree = None, *, _parts: tuple | None = None):
        if _parts is None:
            paths = jax.tree_util.tree_flatten_with_path(params)[0]
            _parts = (
                tuple(key_name(p[0]) if p else "" for p, _ in paths),
                tuple(_named(x) for _, x in paths),
            )
        self.names, self.shardings = _parts
        self._key = _parts

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Layout) and other._key == self._key

    def block(self, name: str | None) -> Layout:
        """The layout of the top-level entry ``name`` of the params (all of them for None)."""
        if name is None:
            return self
        keep = [i for i, n in enumerate(self.names) if n == name]
        return Layout(_parts=(tuple(name for _ in keep), tuple(self.shardings[i] for i in keep)))

    def _apply(self, tree: PyTree, lead: int) -> PyTree:
        if not any(s is not None for s in self.shardings):
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        if len(leaves) != len(self.shardings):
            raise ValueError(f"a layout of {len(self.shardings)} leaves for {len(leaves)}")
        out = []
        for x, s in zip(leaves, self.shardings, strict=True):
            if s is not None:
                spec = PartitionSpec(*(None,) * lead, *s.spec)
                x = jax.lax.with_sharding_constraint(x, NamedSharding(s.mesh, spec))
            out.append(x)
        return jax.tree.unflatten(treedef, out)

    def vector(self, tree: PyTree) -> PyTree:
        """``tree`` (shaped like params) sharded as the params."""
        return self._apply(tree, 0)

    def stack(self, tree: PyTree, lead: int = 1) -> PyTree:
        """A stack (``lead`` leading axes, never split) whose other axes are the params'."""
        return self._apply(tree, lead)


def key_name(key: Any) -> str:
    """A path entry's name: a dict key, attribute name or index, as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
