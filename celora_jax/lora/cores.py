"""The cores of tri-matrix adapter pytrees as one array: what CE-LoRA clients send, what
the server stacks and mixes, and how much of an update they carry.

``stack_cores`` turns the cores of every adapted layer (optionally with a leading client
axis) into one ``[..., L, r, r]`` array in a fixed layer order (a ``stacked`` module's
``[..., L_block, r, r]`` core contributes its L_block layers in order); ``unstack_cores`` puts a
mixed array back; ``core_share`` measures what part of each layer's update the core holds.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from celora_jax import _checks
from celora_jax.lora.adapters import Params, adapter_modules, layer_axes, path_string

Array = jax.Array


def stack_cores(adapters: Params) -> Array:
    """All cores of a (possibly client-stacked) adapter pytree as one array.

    Args:
      adapters: tri-matrix adapters; every core ``[..., r, r]`` with the same leading axes
        (e.g. a client axis).

    Returns:
      ``[..., L, r, r]`` with layers in sorted path order (a stacked module's layers in
      their own order), the order :func:`unstack_cores` expects and the layout :func:`celora_jax.server_step` takes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import AdapterConfig, init_adapters, stack_cores
      >>> params = {"q": {"kernel": jnp.zeros((8, 8))}, "v": {"kernel": jnp.zeros((8, 8))}}
      >>> adapters = init_adapters(jax.random.key(0), params, AdapterConfig(rank=2, target="kernel"))
      >>> clients = jax.tree.map(lambda x: jnp.stack([x] * 5), adapters)  # 5 clients
      >>> stack_cores(clients).shape
      (5, 2, 2, 2)
    """
    modules = adapter_modules(adapters)
    _stacked_core_shape("stack_cores", modules)
    return jnp.concatenate([_with_layer_axis(p, modules[p]["C"]) for p in sorted(modules)], axis=-3)


def _with_layer_axis(path: tuple[str, ...], factor: Array) -> Array:
    """``[..., k, a, b]``: a per-layer factor gets a layer axis of 1, a stacked one keeps its."""
    return factor if layer_axes(path) else factor[..., None, :, :]


def _layers_of(path: tuple[str, ...], core: Array) -> int:
    return _checks.shape_of(core)[-3] if layer_axes(path) else 1


def _stacked_core_shape(function: str, modules: Mapping[tuple[str, ...], Mapping]) -> tuple[int, ...]:
    """[..., L, r, r] of the cores of ``modules``, after checking that they can be stacked."""
    if not modules:
        _checks.fail(function, "adapters is empty")
    missing = [path_string(p) for p, adapter in modules.items() if "C" not in adapter]
    if missing:
        _checks.fail(function, f"adapters at {missing} have no core 'C' (two-factor LoRA "
                               f"adapters have no cores to stack)")
    shapes = {path_string(p): _checks.shape_of(modules[p]["C"]) for p in sorted(modules)}
    # A stacked module's core [..., L, r, r] has one (layer) axis more than a per-layer one's.
    per_layer = set()
    for path in modules:
        shape = _checks.shape_of(modules[path]["C"])
        if layer_axes(path) and len(shape) < 3:
            _checks.fail(function, f"the core of the stacked module {path_string(path)} must be [..., L, r, r], "
                                   f"got {shape}")
        per_layer.add(shape[:-3] + shape[-2:] if layer_axes(path) else shape)
    first = next(iter(per_layer))
    if len(per_layer) > 1 or len(first) < 2 or first[-1] != first[-2]:
        _checks.fail(function, f"all cores must share one shape [..., r, r] ([..., L, r, r] under a "
                               f"'stacked' module); got {shapes}")
    layers = sum(_layers_of(p, modules[p]["C"]) for p in modules)
    return (*first[:-2], layers, *first[-2:])


def unstack_cores(adapters: Params, cores: Array) -> dict:
    """Inverse of :func:`stack_cores`: writes ``cores [..., L, r, r]`` back into ``adapters``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import AdapterConfig, init_adapters, stack_cores, unstack_cores
      >>> params = {"q": {"kernel": jnp.zeros((8, 8))}, "v": {"kernel": jnp.zeros((8, 8))}}
      >>> adapters = init_adapters(jax.random.key(0), params, AdapterConfig(rank=2, target="kernel"))
      >>> updated = unstack_cores(adapters, 3 * stack_cores(adapters))
      >>> updated["v"]["C"]
      Array([[3., 0.],
             [0., 3.]], dtype=float32)
    """
    modules = adapter_modules(adapters)
    expected = _stacked_core_shape("unstack_cores", modules)
    if _checks.shape_of(cores) != expected:
        _checks.fail("unstack_cores", f"cores must have shape {expected} ([..., L, r, r] for the "
                                      f"{len(modules)} cores of adapters), got {_checks.shape_of(cores)}")
    flat = dict(traverse_util.flatten_dict(adapters))
    start = 0
    for module_path in sorted(modules):
        count = _layers_of(module_path, modules[module_path]["C"])
        block = cores[..., start:start + count, :, :]
        flat[module_path + ("C",)] = block if layer_axes(module_path) else block[..., 0, :, :]
        start += count
    return traverse_util.unflatten_dict(flat)


def core_share(adapters: Params) -> Array:
    """The part of each tri-matrix update that the core's departure from identity carries.

    For one adapter this is ``‖A (C − I) B‖_F / ‖A C B‖_F``: 0 when the core is still the
    identity (so mixing cores across clients changes nothing), about 1 or more when the
    shared core dominates the update. Since only cores travel in CE-LoRA, it measures how
    much of what a client learned can reach the others. It assumes cores that start at the
    identity (the default init; not the core-only ablation, whose C starts at 0 and carries
    the whole update by construction). Computed from r × r Gram matrices
    (``‖A M B‖²_F = tr(Mᵀ AᵀA M BBᵀ)``), never forming the dense d_in × d_out update.

    Args:
      adapters: tri-matrix adapters, possibly with leading axes (e.g. clients) on every factor.

    Returns:
      ``[..., L]`` with layers in sorted path order (as :func:`stack_cores`); 0 where the
      update itself is zero (e.g. B = 0 before training).

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import core_share
      >>> adapter = {"A": jnp.eye(2), "C": 2 * jnp.eye(2), "B": jnp.eye(2)}
      >>> core_share({"q": adapter})  # A (C - I) B = I, A C B = 2 I
      Array([0.5], dtype=float32)
    """
    modules = adapter_modules(adapters)
    _stacked_core_shape("core_share", modules)

    def squared_norm(a, core, b):
        gram_a = jnp.swapaxes(a, -1, -2) @ a
        gram_b = b @ jnp.swapaxes(b, -1, -2)
        return jnp.sum((jnp.swapaxes(core, -1, -2) @ gram_a @ core) * gram_b, axis=(-2, -1))

    shares = []
    for path in sorted(modules):
        a, core, b = (_with_layer_axis(path, modules[path][name]) for name in ("A", "C", "B"))
        eye = jnp.eye(core.shape[-1], dtype=core.dtype)
        full = squared_norm(a, core, b)
        departed = squared_norm(a, core - eye, b)
        shares.append(jnp.where(full > 0, jnp.sqrt(jnp.maximum(departed, 0.0) / jnp.where(full > 0, full, 1.0)),
                                0.0))
    return jnp.concatenate(shares, axis=-1)
