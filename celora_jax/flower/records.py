"""Pytrees in Flower records: an ``ArrayRecord`` of the leaves by path
(``celora_jax.server.wire``), with a ``ConfigRecord`` of their dtypes beside it, because Flower's
arrays keep bfloat16 only as raw bytes.

``put_tree(content, "upload", tree)`` stores ``content["upload"]`` (the arrays) and
``content["upload.dtypes"]``; ``take_tree(content, "upload", like)`` rebuilds and checks it
against the pytree the receiver expects.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from celora_jax.server import wire

PyTree = Any


def dtypes_key(name: str) -> str:
    return f"{name}.dtypes"


def put_tree(content: RecordDict, name: str, tree: Mapping) -> None:
    """Stores ``tree`` as ``content[name]`` (arrays by path) and its dtypes beside it."""
    arrays, dtypes = wire.flatten_tree(tree)
    content[name] = ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})
    content[dtypes_key(name)] = ConfigRecord(dtypes)


def has_tree(content: RecordDict, name: str) -> bool:
    return name in content.array_records


def _flat(content: RecordDict, name: str, what: str) -> tuple[dict, dict]:
    if name not in content.array_records or dtypes_key(name) not in content.config_records:
        raise wire.WireError(f"{what} has no {name!r} record")
    arrays = content.array_records[name]
    return ({key: arrays[key].numpy() for key in arrays},
            {key: str(value) for key, value in content.config_records[dtypes_key(name)].items()})


def take_tree(content: RecordDict, name: str, like: Mapping, *, what: str, require_finite: bool = False) -> dict:
    """The pytree shaped like ``like`` from ``content[name]`` (``wire.WireError`` on any mismatch)."""
    return wire.unflatten_tree(*_flat(content, name, what), like, what=what, require_finite=require_finite)


def read_tree(content: RecordDict, name: str, *, what: str = "the message") -> dict:
    """A pytree as its sender laid it out, with no template (``wire.tree_from_record``)."""
    return wire.tree_from_record(*_flat(content, name, what))


def tree_bytes(tree: Mapping) -> int:
    """Payload bytes of a pytree on the wire (what the simulator's byte counters count)."""
    return wire.record_bytes(wire.flatten_tree(tree)[0])
