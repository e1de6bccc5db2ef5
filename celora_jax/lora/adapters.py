"""Functional tri-matrix (CE-LoRA) and two-factor LoRA adapters over parameter pytrees.

An adapter pytree mirrors the module structure of the base parameters: for a targeted
kernel at ``(..., "query", "kernel")`` the adapter lives at ``(..., "query")`` and holds
``{"A": [d_in, r], "C": [r, r], "B": [r, d_out]}`` (tri-matrix, METHOD.md §1) or
``{"A", "B"}`` (classic LoRA). Everything here is a pure function over plain dicts of
arrays, so ``jax.vmap`` over a leading client axis of an adapter pytree just works.

The adapted map is ``y = x W0 + b + s · ((x A) C) B`` with ``s = alpha / r``.

Stacked layers: a model that runs its blocks under ``nn.scan`` keeps one kernel
``[L, d_in, d_out]`` per block position under a module named ``stacked`` (``STACKED``)
instead of ``layer_0 … layer_{L-1}``; its adapter then holds ``A: [L, d_in, r]``,
``C: [L, r, r]``, ``B: [L, r, d_out]``, one slice per layer. ``stack_layers`` and
``unstack_layers`` convert between the two layouts.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from celora_jax import _checks
# The configuration and the layer-layout helpers live in their own modules; they are part of
# this one's API too.
from celora_jax.lora.adapter_config import (DEFAULT_TARGET, GRADIENT_SVD, INITS, LORA, RANDOM_INIT,
                                            SHARED_BASIS_INITS, TRI, WEIGHT_SVD, AdapterConfig,
                                            AdapterConfigError)
from celora_jax.lora.layer_layout import STACKED, kernel_keys, layer_axes, stack_layers, unstack_layers
from celora_jax.lora.svd_basis import weight_svd_factors

__all__ = [  # what `from celora_jax.lora.adapters import *` and the API docs show
    "TRI", "LORA", "STACKED", "DEFAULT_TARGET", "AdapterConfig", "AdapterConfigError", "path_string",
    "layer_axes", "is_kernel", "target_kernel_paths", "stack_layers", "unstack_layers", "init_adapters",
    "init_factors", "weight_svd_factors", "INITS", "RANDOM_INIT", "WEIGHT_SVD", "GRADIENT_SVD",
    "SHARED_BASIS_INITS", "adapter_delta", "adapter_output", "adapted_linear", "merge_kernel", "merge_adapters",
    "adapter_modules", "to_two_factor"]

Array = jax.Array
PyTree = Any
# A nested dict whose leaves are arrays, keyed by module names.
Params = Mapping[str, Any]

def path_string(path: tuple[str, ...]) -> str:
    return "/".join(str(p) for p in path)


def is_kernel(path: tuple[str, ...], leaf: Any) -> bool:
    """A 2-D ``[d_in, d_out]`` parameter, or ``[L, d_in, d_out]`` under a ``stacked`` module."""
    return getattr(leaf, "ndim", 0) == 2 + layer_axes(path)


def target_kernel_paths(params: Params, target: str) -> list[tuple[str, ...]]:
    """Paths of the kernels (``is_kernel``) whose "/"-joined path matches ``target`` (sorted)."""
    pattern = re.compile(target)
    flat = traverse_util.flatten_dict(params)
    return sorted(
        path for path, leaf in flat.items()
        if is_kernel(path, leaf) and pattern.search(path_string(path))
    )


def init_adapters(key: Array, params: Params, config: AdapterConfig) -> dict:
    """Creates adapters for every targeted kernel of ``params``.

    Args:
      key: PRNG key. Use the same key for every client so that all clients start from
        the same A and their cores live in a common basis (METHOD.md §1, [decided]).
      params: base parameters (nested dict); kernels are [d_in, d_out], or [L, d_in, d_out]
        under a ``stacked`` module.
      config: the adapter configuration.

    Returns:
      A nested dict mirroring the module structure of the targeted kernels. Per kernel
      ``A: [d_in, r]`` ~ N(0, a_init_std²), ``B: [r, d_out]`` = 0 and, for "tri",
      ``C: [r, r]`` = I. With ``core_only``: B ~ N(0, a_init_std²) and C = 0. A stacked
      kernel gets factors with the same leading L: exactly ``stack_layers`` of what the
      same key draws for the unstacked parameters.

    Raises:
      AdapterConfigError: the regex matches no 2-D parameter, or the rank exceeds
        min(d_in, d_out) of a matched kernel.
      ValueError: ``params`` is not a mapping.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import AdapterConfig, init_adapters
      >>> params = {"mlp": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros(32)}}
      >>> adapters = init_adapters(jax.random.key(0), params, AdapterConfig(rank=4, target="kernel"))
      >>> {name: factor.shape for name, factor in adapters["mlp"].items()}
      {'A': (16, 4), 'B': (4, 32), 'C': (4, 4)}
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"init_adapters: params must be a nested mapping of arrays, got "
                         f"{type(params).__name__} (for other pytrees use celora_jax.adapt)")
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"init_adapters: config must be an AdapterConfig, got {type(config).__name__}")
    if config.kind is None:
        raise AdapterConfigError("init_adapters: config.kind is None; choose 'tri' or 'lora'")
    paths = target_kernel_paths(params, config.target)
    if not paths:
        kernels = [path_string(p) for p, v in traverse_util.flatten_dict(params).items() if is_kernel(p, v)]
        raise AdapterConfigError(
            f"adapter target regex {config.target!r} matches no 2-D kernel; "
            f"examples of kernel paths: {kernels[:4]}")
    flat_params = traverse_util.flatten_dict(params)
    for path in paths:
        d_in, d_out = flat_params[path].shape[-2:]
        if config.rank > min(d_in, d_out):
            raise AdapterConfigError(
                f"adapter rank {config.rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} "
                f"of kernel {path_string(path)} with shape {tuple(flat_params[path].shape)}")
    keys = kernel_keys(key, {path: flat_params[path].shape for path in paths})
    flat_adapters = {}
    for path in paths:
        kernel = flat_params[path]
        d_in, d_out = kernel.shape[-2:]
        if layer_axes(path):
            factors = jax.vmap(lambda k, w: init_factors(k, d_in, d_out, config, w))(keys[path], kernel)
        else:
            factors = init_factors(keys[path], d_in, d_out, config, kernel)
        for name, value in factors.items():
            flat_adapters[path[:-1] + (name,)] = value
    return traverse_util.unflatten_dict(flat_adapters)


def init_factors(key: Array, d_in: int, d_out: int, config: AdapterConfig, kernel: Array | None = None) -> dict:
    """The initial factors of one adapted ``[d_in, d_out]`` kernel (see ``init_adapters``);
    ``kernel``, the pretrained weight, is needed by ``init="weight_svd"`` only."""
    if config.init == GRADIENT_SVD:  # the clients' sketches fill A and B in round 0
        r = config.rank
        return {"A": jnp.zeros((d_in, r), jnp.float32), "C": jnp.zeros((r, r), jnp.float32),
                "B": jnp.zeros((r, d_out), jnp.float32)}
    if config.init == WEIGHT_SVD:
        if kernel is None:
            raise AdapterConfigError("adapter init 'weight_svd' builds A and B from the pretrained kernel: "
                                     "pass the kernel to init_factors")
        return weight_svd_factors(kernel, config.rank)
    key_a, key_b = jax.random.split(key)
    r = config.rank
    factors = {"A": config.a_init_std * jax.random.normal(key_a, (d_in, r), jnp.float32)}
    if config.core_only:
        factors["B"] = config.a_init_std * jax.random.normal(key_b, (r, d_out), jnp.float32)
        factors["C"] = jnp.zeros((r, r), jnp.float32)
        return factors
    factors["B"] = jnp.zeros((r, d_out), jnp.float32)
    if config.kind == TRI:
        factors["C"] = jnp.eye(r, dtype=jnp.float32)
    return factors


def adapter_delta(adapter: Mapping[str, Array]) -> Array:
    """The dense update A·C·B (or A·B) of one adapter, unscaled.

    Args:
      adapter: ``{"A": [..., d_in, r], "C": [..., r, r], "B": [..., r, d_out]}`` ("C"
        absent for two-factor LoRA); leading axes (layers, clients) batch the product.

    Returns:
      ``[..., d_in, d_out]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import adapter_delta
      >>> adapter = {"A": jnp.ones((3, 2)), "C": 2 * jnp.eye(2), "B": jnp.ones((2, 5))}
      >>> adapter_delta(adapter)[0]
      Array([4., 4., 4., 4., 4.], dtype=float32)
    """
    _checks.factor_dims("adapter_delta", adapter)
    inner = adapter["A"] @ adapter["C"] if "C" in adapter else adapter["A"]
    return inner @ adapter["B"]


def adapter_output(x: Array, adapter: Mapping[str, Array], scale: float) -> Array:
    """s · ((x A) C) B, never forming the dense d_in × d_out update.

    Args:
      x: ``[..., d_in]`` inputs; the factors are cast to ``x.dtype``.
      adapter: ``{"A": [d_in, r], "C": [r, r], "B": [r, d_out]}`` ("C" optional).
      scale: s = alpha / r.

    Returns:
      ``[..., d_out]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import adapter_output
      >>> adapter = {"A": jnp.ones((3, 2)), "C": jnp.eye(2), "B": jnp.ones((2, 4))}
      >>> adapter_output(jnp.ones((5, 3)), adapter, scale=0.5).shape
      (5, 4)
      >>> adapter_output(jnp.ones((5, 7)), adapter, scale=0.5)
      Traceback (most recent call last):
      ...
      ValueError: adapter_output: x must have shape [..., 3] (inputs, d_in = 3 from adapter['A']), got (5, 7)
    """
    d_in, _, _ = _checks.factor_dims("adapter_output", adapter)
    _checks.check_trailing("adapter_output", "x", x, (d_in,), f"inputs, d_in = {d_in} from adapter['A']")
    dtype = x.dtype
    hidden = x @ adapter["A"].astype(dtype)
    if "C" in adapter:
        hidden = hidden @ adapter["C"].astype(dtype)
    return scale * (hidden @ adapter["B"].astype(dtype))


def adapted_linear(x: Array, kernel: Array, bias: Array | None,
                   adapter: Mapping[str, Array] | None, scale: float) -> Array:
    """x W0 + b + s · ((x A) C) B: a linear layer with an adapter beside its frozen kernel.

    Args:
      x: ``[..., d_in]``.
      kernel: W0, ``[d_in, d_out]``.
      bias: ``[d_out]`` or None.
      adapter: the kernel's adapter (shapes as in :func:`adapter_output`) or None.
      scale: s = alpha / r.

    Returns:
      ``[..., d_out]``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import adapted_linear
      >>> kernel = jnp.eye(3)
      >>> adapter = {"A": jnp.ones((3, 1)), "C": jnp.eye(1), "B": jnp.zeros((1, 3))}
      >>> adapted_linear(jnp.arange(3.0), kernel, None, adapter, 1.0)  # B = 0: the base layer
      Array([0., 1., 2.], dtype=float32)
    """
    d_in, d_out = _checks.check_trailing("adapted_linear", "kernel", kernel, (None, None), "[d_in, d_out]")
    if len(_checks.shape_of(kernel)) != 2:
        _checks.fail("adapted_linear", f"kernel must be 2-D [d_in, d_out], got {_checks.shape_of(kernel)}")
    _checks.check_trailing("adapted_linear", "x", x, (d_in,), f"inputs, d_in = {d_in} from kernel")
    if bias is not None:
        _checks.check_trailing("adapted_linear", "bias", bias, (d_out,), f"d_out = {d_out} from kernel")
    if adapter is not None:
        _check_adapter_fits("adapted_linear", adapter, (d_in, d_out))
    # Matmuls on [tokens, d_in]: with [batch, seq, d_in] operands XLA:CPU materializes a
    # transposed copy of each [batch, seq, d_out] cotangent for the adapters' weight
    # gradients, which cost ~40% of a MiniLM training step (benchmarks/round_speed.py).
    lead = _checks.shape_of(x)[:-1]
    x = jnp.reshape(x, (-1, d_in))
    y = x @ kernel
    if bias is not None:
        y = y + bias
    if adapter is not None:
        y = y + adapter_output(x, adapter, scale)
    return jnp.reshape(y, (*lead, d_out))


def _check_adapter_fits(function: str, adapter: Mapping[str, Array], kernel_dims: tuple[int, int],
                        name: str = "adapter") -> None:
    d_in, _, d_out = _checks.factor_dims(function, adapter, name)
    if (d_in, d_out) != tuple(kernel_dims):
        _checks.fail(function, f"{name} maps {d_in} -> {d_out} (A is [{d_in}, r], B is [r, {d_out}]) "
                               f"but the kernel is {tuple(kernel_dims)}")


def merge_kernel(kernel: Array, adapter: Mapping[str, Array], scale: float) -> Array:
    """Folds one adapter into its dense kernel: W0 + s · A C B, in the kernel's dtype.

    Args:
      kernel: ``[..., d_in, d_out]`` (a leading layer axis needs the same on the factors).
      adapter: ``{"A": [..., d_in, r], "C": [..., r, r], "B": [..., r, d_out]}``.
      scale: s = alpha / r.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import merge_kernel
      >>> adapter = {"A": jnp.ones((2, 1)), "C": jnp.eye(1), "B": jnp.ones((1, 2))}
      >>> merge_kernel(jnp.zeros((2, 2)), adapter, scale=0.5)
      Array([[0.5, 0.5],
             [0.5, 0.5]], dtype=float32)
    """
    _check_adapter_fits("merge_kernel", adapter, _checks.shape_of(kernel)[-2:])
    return kernel + scale * adapter_delta(adapter).astype(kernel.dtype)


def merge_adapters(params: Params, adapters: Params, scale: float) -> dict:
    """Returns ``params`` with every adapted kernel replaced by W0 + s·A·C·B.

    Use it to serve a client's model without the adapter path (one dense kernel per layer).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import AdapterConfig, init_adapters, merge_adapters
      >>> params = {"mlp": {"kernel": jnp.zeros((8, 8))}}
      >>> adapters = init_adapters(jax.random.key(0), params, AdapterConfig(rank=2, target="kernel"))
      >>> merged = merge_adapters(params, adapters, scale=1.0)
      >>> bool(jnp.all(merged["mlp"]["kernel"] == 0))  # B starts at zero: nothing changes yet
      True
    """
    flat_params = dict(traverse_util.flatten_dict(params))
    for module_path, adapter in adapter_modules(adapters).items():
        kernel_path = module_path + ("kernel",)
        if kernel_path not in flat_params:
            raise AdapterConfigError(f"adapter at {path_string(module_path)} has no kernel in params")
        flat_params[kernel_path] = merge_kernel(flat_params[kernel_path], adapter, scale)
    return traverse_util.unflatten_dict(flat_params)


def adapter_modules(adapters: Params) -> dict[tuple[str, ...], dict]:
    """Flat view {module path: {"A", "C", "B"}} of an adapter pytree."""
    grouped: dict[tuple[str, ...], dict] = {}
    for path, leaf in traverse_util.flatten_dict(adapters).items():
        grouped.setdefault(path[:-1], {})[path[-1]] = leaf
    return grouped


def to_two_factor(adapters: Params) -> dict:
    """Exports tri-matrix adapters as standard LoRA pairs (A, C·B), same scale.

    Any LoRA runtime (e.g. PEFT) can then serve a CE-LoRA client: A (C B) = A C B.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import AdapterConfig, init_adapters, to_two_factor
      >>> params = {"mlp": {"kernel": jnp.zeros((8, 6))}}
      >>> adapters = init_adapters(jax.random.key(0), params, AdapterConfig(rank=2, target="kernel"))
      >>> {name: factor.shape for name, factor in to_two_factor(adapters)["mlp"].items()}
      {'A': (8, 2), 'B': (2, 6)}
    """
    flat = {}
    for module_path, adapter in adapter_modules(adapters).items():
        _checks.factor_dims("to_two_factor", adapter, f"adapter {path_string(module_path)!r}")
        flat[module_path + ("A",)] = adapter["A"]
        flat[module_path + ("B",)] = adapter["C"] @ adapter["B"] if "C" in adapter else adapter["B"]
    return traverse_util.unflatten_dict(flat)
