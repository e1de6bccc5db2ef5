"""Argument checks for the public functions (chex-style, but raising ``ValueError``).

Shapes and dtypes are static under ``jit`` and ``vmap``, so these checks run once per trace
at the Python boundary and cost nothing in the compiled program. Every message names the
function, the argument and the expected shape, so a mistake is reported where it is made
rather than as an XLA dot-dimension error deep inside a trace.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np


def comma_list(text: str) -> tuple[str, ...]:
    """The items of a comma-separated config value, e.g. ``"8, 16,32"`` -> ``("8", "16", "32")``.

    The one reading of every list-valued string field (ranks, class names, backends): items
    are stripped of spaces and quotes; an empty item stays, for the field to refuse or skip;
    a blank value has no items.

    Examples:
      >>> comma_list(" tensorboard, mlflow")
      ('tensorboard', 'mlflow')
      >>> comma_list("'neg','pos'")
      ('neg', 'pos')
      >>> comma_list("a,,b"), comma_list(" ")
      (('a', '', 'b'), ())
    """
    if not text.strip():
        return ()
    return tuple(part.strip().strip("'\"").strip() for part in text.split(","))


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


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key (e.g.
    ``federation.rounds``) and what was expected."""


def _allowed_types(hint) -> tuple:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (dict, list, tuple):
        return (typing.get_origin(hint),)
    return tuple(typing.get_origin(a) or a for a in args) if args else (hint,)


def _type_names(allowed: tuple) -> str:
    return " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)


def check_fields(config, section: str) -> None:
    """Every field of the dataclass ``config`` holds a value of its annotated type.

    Ints stand in for floats but bools for neither; floats must be finite; None only where
    the hint allows it; a nested dataclass must be of its annotated class. Raises
    ``ConfigError`` naming ``section.field``. Called first in ``__post_init__``, so that the
    range checks after it compare numbers, never a string with an int.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, allowed = getattr(config, field.name), _allowed_types(hints[field.name])
        key = f"{section}.{field.name}" if section else field.name
        if any(t is typing.Any for t in allowed):
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        fits = (any(isinstance(value, t) and not (isinstance(value, bool) and t in (int, float))
                    for t in allowed if isinstance(t, type))
                or (is_number and isinstance(value, int) and float in allowed))
        if not fits:
            raise ConfigError(f"{key} expects {_type_names(allowed)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
