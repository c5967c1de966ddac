"""Argument checks shared by the measures: each error names the argument and the fix."""

from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive Python int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}; pass {name}=1 or more.")
    return int(value)


def positive_number(name: str, value: Any) -> None:
    # Traced values cannot be checked here; only concrete Python numbers are.
    if isinstance(value, Real) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(
            f"Unknown {name}={value!r}; choose one of {', '.join(map(repr, options))}."
        )
    return value


def require_key(key: Any, why: str) -> None:
    if key is None:
        raise ValueError(f"key is required {why}; pass key=jax.random.key(0) (or any PRNG key).")
