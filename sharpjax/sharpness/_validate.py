"""Argument checks shared by the measures: each error names the argument and the fix."""

from collections.abc import Iterable
from numbers import Integral
from typing import Any

import jax

from sharpjax.core import check_constant, check_float_params, check_scalar_or_schedule

__all__ = ["check_float_params", "choice", "positive_int", "positive_number", "require_key"]


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive Python int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}; pass {name}=1 or more.")
    return int(value)


def is_key(value: Any) -> bool:
    """A PRNG key: typed (``jax.random.key``) or raw (``jax.random.PRNGKey``, uint32 ``(2,)``)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return str(dtype) == "uint32" and getattr(value, "shape", None) == (2,)


def positive_number(name: str, value: Any) -> None:
    """A finite number > 0: Python numbers and concrete arrays are checked here; a traced value
    cannot be, and the measure then returns NaN for a value out of range (see :func:`valid`)."""
    if is_key(value):
        raise TypeError(f"{name} must be a positive number, got a PRNG key.")
    check_constant(name, value)
    check_scalar_or_schedule(name, value, 0, open_low=True)


def valid(value: Any) -> jax.Array:
    """``value`` if finite and > 0, else NaN: the run-time side of :func:`positive_number`."""
    value = jax.numpy.asarray(value)
    return jax.numpy.where(jax.numpy.isfinite(value) & (value > 0), value, jax.numpy.nan)


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = tuple(options)
    # Only strings (and None) are compared: an array here would raise an unrelated error.
    if not (value is None or isinstance(value, str)) or value not in options:
        raise ValueError(
            f"Unknown {name}={value!r}; choose one of {', '.join(map(repr, options))}."
        )
    return value


def require_key(key: Any, why: str) -> None:
    if key is None:
        raise ValueError(f"key is required {why}; pass key=jax.random.key(0) (or any PRNG key).")
