"""Argument checks for the public functions (chex-style, but raising ``ValueError``).

Shapes and dtypes are static under ``jit`` and ``vmap``, so these checks run once per trace
at the Python boundary and cost nothing in the compiled program. Every message names the
function, the argument and the expected shape, so a mistake is reported where it is made
rather than as an XLA dot-dimension error deep inside a trace.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(np.shape(value))


def fail(function: str, message: str) -> None:
    raise ValueError(f"{function}: {message}")


def check_floating(function: str, name: str, value: Any) -> None:
    dtype = getattr(value, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        fail(function, f"{name} must be a floating-point array, got "
                       f"{dtype if dtype is not None else type(value).__name__}")


def check_trailing(function: str, name: str, value: Any, expected: Sequence[int | None],
                   meaning: str) -> tuple[int, ...]:
    """Checks the last ``len(expected)`` dims (None = any); leading batch dims are allowed.

    Returns the actual trailing dims so that callers can bind them.
    """
    shape = shape_of(value)
    if len(shape) < len(expected) or any(
            want is not None and got != want
            for got, want in zip(shape[len(shape) - len(expected):], expected)):
        wanted = ", ".join("?" if d is None else str(d) for d in expected)
        fail(function, f"{name} must have shape [..., {wanted}] ({meaning}), got {shape}")
    return shape[len(shape) - len(expected):]


def factor_dims(function: str, adapter: Any, name: str = "adapter") -> tuple[int, int, int]:
    """Validates one adapter {"A", ["C",] "B"} and returns (d_in, r, d_out).

    Leading axes (layers, clients) are allowed as long as the factors agree on them.
    """
    if not isinstance(adapter, Mapping) or "A" not in adapter or "B" not in adapter:
        keys = sorted(adapter) if isinstance(adapter, Mapping) else type(adapter).__name__
        fail(function, f"{name} must be a mapping with factors 'A', 'B' (and 'C' for "
                       f"tri-matrix adapters), got {keys}")
    for factor in adapter:
        check_floating(function, f"{name}[{factor!r}]", adapter[factor])
    d_in, r = check_trailing(function, f"{name}['A']", adapter["A"], (None, None), "[d_in, r]")
    if "C" in adapter:
        check_trailing(function, f"{name}['C']", adapter["C"], (r, r), f"[r, r] with r = {r} from A")
    _, d_out = check_trailing(function, f"{name}['B']", adapter["B"], (r, None),
                              f"[r, d_out] with r = {r} from A")
    leading = {factor: shape_of(value)[:-2] for factor, value in adapter.items()}
    if len(set(leading.values())) > 1:
        fail(function, f"{name}'s factors disagree on their leading (layer/client) axes: {leading}")
    return d_in, r, d_out
