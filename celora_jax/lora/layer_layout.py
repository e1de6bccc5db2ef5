"""Two layouts of a model's repeated blocks, and the conversion between them.

Unrolled, block ``i`` has its own module ``layer_<i>`` with its own parameters. Under
``nn.scan`` (``model.scan_layers``), one module named ``stacked`` (``STACKED``) holds every
block's parameters with a leading layer axis ``[L, ...]``; so do the adapters of its kernels
(``A: [L, d_in, r]``, ``C: [L, r, r]``, ``B: [L, r, d_out]``). The functions here work on any
nested dict of arrays: parameters, adapters, cores.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from celora_jax import _checks

Params = Mapping[str, Any]

# A module path segment under which every parameter has a leading layer axis [L, ...].
STACKED = "stacked"
_LAYER_KEY = re.compile(r"layer_(\d+)$")


def layer_axes(path: tuple[str, ...]) -> int:
    """Leading layer axes of the parameters at ``path``: 1 under a ``stacked`` module, else 0."""
    return int(STACKED in path)


def layer_count(tree: Mapping) -> int | None:
    """L when the keys of ``tree`` are exactly layer_0 … layer_{L-1}, else None."""
    indices = sorted(int(m.group(1)) for m in map(_LAYER_KEY.match, map(str, tree)) if m)
    if not tree or len(indices) != len(tree) or indices != list(range(len(tree))):
        return None
    return len(indices)


def unrolled_path(path: tuple[str, ...], index: int) -> tuple[str, ...]:
    """``path`` of layer ``index`` in the unstacked layout (``stacked`` → ``layer_<index>``)."""
    return tuple(f"layer_{index}" if part == STACKED else part for part in path)


def stack_layers(tree: Params) -> dict:
    """Every mapping ``{layer_0: t_0, …, layer_{L-1}: t_{L-1}}`` in ``tree`` becomes
    ``{"stacked": t}`` with each leaf of ``t`` the L leaves stacked on a new axis 0: the
    layout of a model whose blocks run under ``nn.scan``. Works on parameters and adapters.

    Raises:
      ValueError: the layers do not share one structure and shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax.lora.layer_layout import stack_layers, unstack_layers
      >>> tree = {"encoder": {f"layer_{i}": {"kernel": jnp.full((2, 3), i)} for i in range(4)}}
      >>> stack_layers(tree)["encoder"]["stacked"]["kernel"].shape
      (4, 2, 3)
      >>> float(unstack_layers(stack_layers(tree))["encoder"]["layer_3"]["kernel"][0, 0])
      3.0
    """
    if not isinstance(tree, Mapping):
        return tree
    count = layer_count(tree)
    if count is None:
        return {key: stack_layers(value) for key, value in tree.items()}
    layers = [stack_layers(tree[f"layer_{i}"]) for i in range(count)]
    shapes = [jax.tree.map(_checks.shape_of, layer) for layer in layers]
    if any(shape != shapes[0] for shape in shapes):
        differs = next(i for i, shape in enumerate(shapes) if shape != shapes[0])
        raise ValueError(f"stack_layers: layer_{differs} does not have layer_0's parameters and shapes, "
                         f"so the layers cannot share one stacked layout")
    return {STACKED: jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)}


def unstack_layers(tree: Params, axis: int = 0) -> dict:
    """Inverse of :func:`stack_layers`: each ``stacked`` module becomes ``layer_0 …``,
    slicing its leaves along ``axis`` (1 for client-stacked adapters ``[N, L, ...]``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax.lora.layer_layout import unstack_layers
      >>> clients = {"stacked": {"C": jnp.zeros((5, 2, 8, 8))}}  # 5 clients x 2 layers
      >>> sorted(unstack_layers(clients, axis=1)), unstack_layers(clients, axis=1)["layer_1"]["C"].shape
      (['layer_0', 'layer_1'], (5, 8, 8))
    """
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        if key != STACKED:
            out[key] = unstack_layers(value, axis)
            continue
        leaves = jax.tree.leaves(value)
        count = _checks.shape_of(leaves[0])[axis] if leaves else 0
        for index in range(count):
            out[f"layer_{index}"] = unstack_layers(
                jax.tree.map(lambda leaf: jnp.take(leaf, index, axis=axis), value), axis)
    return out


def kernel_keys(key: jax.Array, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> dict:
    """One PRNG key per layer's kernel: ``{path: key}``, or ``{path: [L] keys}`` for a stacked
    kernel ``[L, d_in, d_out]``. Keys follow the sorted order of the per-layer (unrolled)
    paths, so a model under ``nn.scan`` draws for each layer exactly what the unrolled model
    draws (its adapters start as ``stack_layers`` of the unrolled ones)."""
    per_layer = {(path, index): unrolled_path(path, index)
                 for path, shape in shapes.items() for index in range(shape[0] if layer_axes(path) else 1)}
    order = {unrolled: position for position, unrolled in enumerate(sorted(per_layer.values()))}
    keys = jax.random.split(key, len(order))
    return {path: (keys[jnp.asarray([order[per_layer[path, i]] for i in range(shape[0])])] if layer_axes(path)
                   else keys[order[per_layer[path, 0]]])
            for path, shape in shapes.items()}
