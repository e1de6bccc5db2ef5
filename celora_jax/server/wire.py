"""What crosses the network between a client node and the server: pytrees of arrays as flat
records of named numpy arrays, keyed by path, and back.

A real deployment (Flower's ``ArrayRecord``, a file, any transport that carries named byte
buffers) sees only ``{"lora/encoder/layer_0/attention/query/C": ndarray, ...}``. The
receiver rebuilds the pytree against the structure it expects, so a node whose model or
adapter config differs from the server's is caught at the boundary with the offending path
named, not deep inside a jitted kernel. bfloat16 leaves travel as their 16-bit patterns
(``uint16``) with the dtype recorded beside them, because numpy has no bfloat16 of its own
and record formats built on ``np.save`` do not keep ``ml_dtypes`` types.

Examples:
  >>> import numpy as np
  >>> tree = {"lora": {"q": {"C": np.eye(2, dtype=np.float32)}}}
  >>> arrays, dtypes = flatten_tree(tree)
  >>> sorted(arrays), dtypes
  (['lora/q/C'], {'lora/q/C': 'float32'})
  >>> unflatten_tree(arrays, dtypes, like=tree)["lora"]["q"]["C"].tolist()
  [[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

SEPARATOR = "/"
_BFLOAT16 = "bfloat16"


class WireError(ValueError):
    """A record does not match the pytree its receiver expects (missing or unexpected keys,
    shapes or dtypes that differ, non-finite values where they are refused)."""


def _as_numpy(leaf) -> tuple[np.ndarray, str]:
    array = np.asarray(leaf)
    dtype = str(array.dtype)
    if dtype == _BFLOAT16:
        return array.view(np.uint16), dtype
    return np.asarray(array, order="C"), dtype  # (ascontiguousarray would make 0-d arrays 1-d)


def flatten_tree(tree: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(arrays, dtypes)``: every leaf of the nested mapping ``tree`` as a numpy array under
    its "/"-joined path (bfloat16 as uint16 bit patterns), and each leaf's dtype name.

    Raises:
      WireError: a key contains the separator "/" (the path would be ambiguous).
    """
    arrays, dtypes = {}, {}
    for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
        names = [str(p) for p in path]
        if any(SEPARATOR in name for name in names):
            raise WireError(f"key {names} contains {SEPARATOR!r}, which joins the path of a record")
        key = SEPARATOR.join(names)
        arrays[key], dtypes[key] = _as_numpy(leaf)
    return arrays, dtypes


def _restore(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == _BFLOAT16:
        import ml_dtypes

        return np.asarray(array).view(np.uint16).view(ml_dtypes.bfloat16)
    return np.asarray(array).astype(dtype, copy=False)


def unflatten_tree(arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str], like: Mapping[str, Any], *,
                   what: str = "record", require_finite: bool = False) -> dict:
    """The pytree with the structure, shapes and dtypes of ``like`` rebuilt from a record.

    Args:
      arrays, dtypes: as ``flatten_tree`` returns them (after any transport).
      like: the pytree the receiver expects (its leaves only give shapes and dtypes).
      what: names the record in errors ("the upload of node 3", ...).
      require_finite: refuse NaN or infinite values (an upload a server must not average).

    Raises:
      WireError: missing or unexpected keys, a shape or dtype other than expected, or
        (``require_finite``) a non-finite value; the message names the first offending path.
    """
    expected = {SEPARATOR.join(str(p) for p in path): leaf
                for path, leaf in traverse_util.flatten_dict(dict(like)).items()}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")]
                 if missing else [])
        parts += ([f"unexpected {unexpected[:3]}" + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3
                                                     else "")] if unexpected else [])
        raise WireError(f"{what} does not match the expected parameters: {'; '.join(parts)} "
                        "(does the sender use the same model, adapter and method config?)")
    flat = {}
    for key, leaf in expected.items():
        want_shape, want_dtype = tuple(np.shape(leaf)), str(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        got_dtype = dtypes.get(key, str(np.asarray(arrays[key]).dtype))
        if got_dtype != want_dtype:
            raise WireError(f"{what}: {key} has dtype {got_dtype}, expected {want_dtype}")
        value = _restore(arrays[key], got_dtype)
        if value.shape != want_shape:
            raise WireError(f"{what}: {key} has shape {value.shape}, expected {want_shape} "
                            "(does the sender use the same model and adapter rank?)")
        floating = value.dtype.kind == "f" or got_dtype == _BFLOAT16
        if require_finite and floating and not np.isfinite(value.astype(np.float32)).all():
            raise WireError(f"{what}: {key} holds NaN or infinite values")
        flat[tuple(key.split(SEPARATOR))] = value
    return traverse_util.unflatten_dict(flat)


def tree_from_record(arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> dict:
    """The pytree a record describes, with no template to check it against (the receiver
    learns the shapes from it, e.g. the server from the first node's initial parameters)."""
    return traverse_util.unflatten_dict({tuple(key.split(SEPARATOR)): _restore(value, dtypes.get(key, str(value.dtype)))
                                         for key, value in arrays.items()})


def record_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of a record: the array buffers alone (what the simulator's byte counters
    count; a transport adds its own headers on top)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
