"""Functional tri-matrix (CE-LoRA) and two-factor LoRA adapters over parameter pytrees.

An adapter pytree mirrors the module structure of the base parameters: for a targeted
kernel at ``(..., "query", "kernel")`` the adapter lives at ``(..., "query")`` and holds
``{"A": [d_in, r], "C": [r, r], "B": [r, d_out]}`` (tri-matrix, METHOD.md §1) or
``{"A", "B"}`` (classic LoRA). Everything here is a pure function over plain dicts of
arrays, so ``jax.vmap`` over a leading client axis of an adapter pytree just works.

The adapted map is ``y = x W0 + b + s · ((x A) C) B`` with ``s = alpha / r``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

Array = jax.Array
PyTree = Any
# A nested dict whose leaves are arrays, keyed by module names.
Params = Mapping[str, Any]

TRI = "tri"
LORA = "lora"

# Every linear layer of a BERT-family encoder block (query, key, value, attention output,
# both MLP layers), as in the authors' code.
DEFAULT_TARGET = r"encoder/layer_\d+/.*/kernel$"


class AdapterConfigError(ValueError):
    """Raised when an adapter configuration cannot be applied to the given parameters."""


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """How adapters are attached to a model.

    Attributes:
      kind: "tri" for CE-LoRA's A·C·B adapter, "lora" for the classic two-factor A·B.
      rank: r, the inner dimension of the factors.
      alpha: scaling numerator; the update is multiplied by alpha / rank. None means
        alpha = rank (scale 1), the authors' default.
      target: regex searched in the "/"-joined path of every 2-D parameter; matches are
        adapted. The default adapts every linear layer of every encoder block.
      a_init_std: standard deviation of A's normal init (1e-3 in the authors' code).
      core_only: ablation of METHOD.md §1: A and B frozen, B drawn random instead of zero,
        C = 0, so that only the core is trained (only meaningful for kind="tri").
    """

    kind: str = TRI
    rank: int = 8
    alpha: float | None = None
    target: str = DEFAULT_TARGET
    a_init_std: float = 1e-3
    core_only: bool = False

    def __post_init__(self):
        if self.kind not in (TRI, LORA):
            raise AdapterConfigError(f"adapter kind must be 'tri' or 'lora', got {self.kind!r}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise AdapterConfigError(f"adapter rank must be a positive integer, got {self.rank!r}")
        if self.core_only and self.kind != TRI:
            raise AdapterConfigError("core_only applies to tri-matrix adapters only")
        try:
            re.compile(self.target)
        except re.error as err:
            raise AdapterConfigError(f"adapter target {self.target!r} is not a valid regex: {err}") from err

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / self.rank


def path_string(path: tuple[str, ...]) -> str:
    return "/".join(str(p) for p in path)


def target_kernel_paths(params: Params, target: str) -> list[tuple[str, ...]]:
    """Paths of the 2-D parameters whose "/"-joined path matches ``target`` (sorted)."""
    pattern = re.compile(target)
    flat = traverse_util.flatten_dict(params)
    return sorted(
        path for path, leaf in flat.items()
        if getattr(leaf, "ndim", 0) == 2 and pattern.search(path_string(path))
    )


def init_adapters(key: Array, params: Params, config: AdapterConfig) -> dict:
    """Creates adapters for every targeted kernel of ``params``.

    Args:
      key: PRNG key. Use the same key for every client so that all clients start from
        the same A and their cores live in a common basis (METHOD.md §1, [decided]).
      params: base parameters (nested dict); kernels are [d_in, d_out].
      config: the adapter configuration.

    Returns:
      A nested dict mirroring the module structure of the targeted kernels. Per kernel
      ``A: [d_in, r]`` ~ N(0, a_init_std²), ``B: [r, d_out]`` = 0 and, for "tri",
      ``C: [r, r]`` = I. With ``core_only``: B ~ N(0, a_init_std²) and C = 0.

    Raises:
      AdapterConfigError: the regex matches no 2-D parameter, or the rank exceeds
        min(d_in, d_out) of a matched kernel.
    """
    paths = target_kernel_paths(params, config.target)
    if not paths:
        kernels = [path_string(p) for p, v in traverse_util.flatten_dict(params).items()
                   if getattr(v, "ndim", 0) == 2]
        raise AdapterConfigError(
            f"adapter target regex {config.target!r} matches no 2-D kernel; "
            f"examples of kernel paths: {kernels[:4]}")
    flat_params = traverse_util.flatten_dict(params)
    flat_adapters = {}
    keys = jax.random.split(key, len(paths))
    for path, path_key in zip(paths, keys):
        d_in, d_out = flat_params[path].shape
        if config.rank > min(d_in, d_out):
            raise AdapterConfigError(
                f"adapter rank {config.rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} "
                f"of kernel {path_string(path)} with shape {(d_in, d_out)}")
        for name, value in _init_factors(path_key, d_in, d_out, config).items():
            flat_adapters[path[:-1] + (name,)] = value
    return traverse_util.unflatten_dict(flat_adapters)


def _init_factors(key: Array, d_in: int, d_out: int, config: AdapterConfig) -> dict:
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
    """The dense update A·C·B (or A·B) of one adapter, unscaled. [d_in, d_out]."""
    inner = adapter["A"] @ adapter["C"] if "C" in adapter else adapter["A"]
    return inner @ adapter["B"]


def adapter_output(x: Array, adapter: Mapping[str, Array], scale: float) -> Array:
    """s · ((x A) C) B for inputs ``x [..., d_in]``; never forms the dense d_in × d_out update."""
    dtype = x.dtype
    hidden = x @ adapter["A"].astype(dtype)
    if "C" in adapter:
        hidden = hidden @ adapter["C"].astype(dtype)
    return scale * (hidden @ adapter["B"].astype(dtype))


def adapted_linear(x: Array, kernel: Array, bias: Array | None,
                   adapter: Mapping[str, Array] | None, scale: float) -> Array:
    """x W0 + b + s · ((x A) C) B."""
    y = x @ kernel
    if bias is not None:
        y = y + bias
    if adapter is not None:
        y = y + adapter_output(x, adapter, scale)
    return y


def merge_kernel(kernel: Array, adapter: Mapping[str, Array], scale: float) -> Array:
    """Folds one adapter into its dense kernel: W0 + s · A C B."""
    return kernel + scale * adapter_delta(adapter).astype(kernel.dtype)


def merge_adapters(params: Params, adapters: Params, scale: float) -> dict:
    """Returns ``params`` with every adapted kernel replaced by W0 + s·A·C·B."""
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
    """Exports tri-matrix adapters as standard LoRA pairs (A, C·B), same scale."""
    flat = {}
    for module_path, adapter in adapter_modules(adapters).items():
        flat[module_path + ("A",)] = adapter["A"]
        flat[module_path + ("B",)] = adapter["C"] @ adapter["B"] if "C" in adapter else adapter["B"]
    return traverse_util.unflatten_dict(flat)


def stack_cores(adapters: Params) -> Array:
    """All cores of a (possibly client-stacked) adapter pytree as one array.

    Returns ``[..., L, r, r]`` with layers in sorted path order, the order
    ``unstack_cores`` expects.
    """
    modules = adapter_modules(adapters)
    return jnp.stack([modules[p]["C"] for p in sorted(modules)], axis=-3)


def unstack_cores(adapters: Params, cores: Array) -> dict:
    """Inverse of ``stack_cores``: writes ``cores [..., L, r, r]`` back into ``adapters``."""
    modules = adapter_modules(adapters)
    flat = dict(traverse_util.flatten_dict(adapters))
    for index, module_path in enumerate(sorted(modules)):
        flat[module_path + ("C",)] = cores[..., index, :, :]
    return traverse_util.unflatten_dict(flat)
