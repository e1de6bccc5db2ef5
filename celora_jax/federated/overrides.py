"""``section.field=value`` overrides of frozen config dataclasses (the CLI's ``--set``).

Values are parsed as Python literals and must fit the field's type hint; every error is a
``ConfigError`` naming the key. Works on any tree of frozen dataclasses (``RunConfig`` in
practice), so it imports no config.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from typing import Any

from celora_jax._checks import ConfigError


def apply_overrides(config, overrides: list[str]):
    """Returns ``config`` with ``section.field=value`` overrides applied.

    Values are parsed as Python literals (``3``, ``0.5``, ``True``, ``None``, ``'x'``; a bool
    field also takes ``true``/``false``) and fall back to plain strings; a value must fit
    the field's type; a string field given a comma list (``8,16,32``) keeps it as typed. The
    overrides of one section are applied together, so fields that are only valid in combination (e.g.
    ``dp.clip_norm`` with ``dp.noise_multiplier``) can be set in either order.
    """
    by_section: dict[tuple[str, ...], dict[str, tuple[Any, str]]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        by_section.setdefault(tuple(path[:-1]), {})[path[-1]] = (_parse(raw.strip()), key)
    for section, values in by_section.items():
        keys = [key.strip() for _, key in values.values()]
        try:
            config = _replace_fields(config, list(section), values)
        except ValueError as err:  # ours (ConfigError, DataError, AdapterConfigError) or a field check's
            message = str(err)
            if not any(key in message for key in keys):
                message = f"{', '.join(keys)}: {message}"
            # Our errors keep their type (a DataError stays one); any other becomes a ConfigError.
            raise (type(err) if isinstance(err, ConfigError) else ConfigError)(message) from None
    return config


def _parse(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _replace_fields(node, path: list[str], values: dict[str, tuple[Any, str]]):
    """Replaces ``values`` (field -> (value, full key)) in the section at ``path``."""
    fields = {f.name: f for f in dataclasses.fields(node)}
    if path:
        head, full_key = path[0], next(iter(values.values()))[1]
        if head not in fields:
            raise ConfigError(f"unknown config key {full_key!r}: {type(node).__name__} has fields "
                             f"{sorted(fields)}")
        current = getattr(node, head)
        if isinstance(current, dict):  # e.g. federation.method_options.fedprox.mu=0.1
            return dataclasses.replace(node, **{head: _set_in_dict(current, path[1:], values)})
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full_key!r}: {head} is not a section")
        return dataclasses.replace(node, **{head: _replace_fields(current, path[1:], values)})
    changes = {}
    for name, (value, full_key) in values.items():
        if name not in fields:
            raise ConfigError(f"unknown config key {full_key!r}: {type(node).__name__} has fields "
                             f"{sorted(fields)}")
        current = getattr(node, name)
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full_key!r} names a section; set one of its fields")
        changes[name] = _coerce(value, current, type(node), name, full_key)
    return dataclasses.replace(node, **changes)


def _set_in_dict(current: dict, path: list[str], values: dict[str, tuple[Any, str]]) -> dict:
    """A copy of ``current`` with ``values`` (key -> (value, full key)) set under ``path``."""
    updated = dict(current)
    if path:
        inner = updated.get(path[0], {})
        if not isinstance(inner, dict):
            raise ConfigError(f"config key {next(iter(values.values()))[1]!r}: {path[0]} is not a dict")
        updated[path[0]] = _set_in_dict(inner, path[1:], values)
        return updated
    updated.update({name: value for name, (value, _) in values.items()})
    return updated


def _coerce(value, current, owner, name, full_key):
    hints = typing.get_type_hints(owner)
    allowed = typing.get_args(hints.get(name)) or (hints.get(name),)
    expected = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        return float(value)
    if isinstance(value, str) and bool in allowed and str not in allowed and value.lower() in ("true", "false"):
        return value.lower() == "true"  # the spelling of YAML, JSON and shells: true/false
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"config key {full_key!r} expects {expected}, got {value!r}")
    for kind in allowed:
        if isinstance(kind, type) and isinstance(value, kind):
            return value
    if str in allowed:
        if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, str)) for v in value):
            return ",".join(str(v) for v in value)  # an unquoted 8,16 parses as a tuple: keep the list typed
        return str(value)
    raise ConfigError(f"config key {full_key!r} expects {expected}, got {value!r}")
