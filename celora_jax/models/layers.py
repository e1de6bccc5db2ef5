"""Layers shared by our Flax models."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from celora_jax.lora.adapters import adapted_linear

Array = jax.Array


class Dense(nn.Module):
    """Linear layer ``x W0 + b`` plus, when the ``lora`` collection has an adapter for
    this module, ``s · ((x A) C) B``."""

    features: int
    lora_scale: float = 1.0
    dtype: Any = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.normal(0.02),
                            (x.shape[-1], self.features), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
                if self.use_bias else None)
        adapter = {name: self.get_variable("lora", name) for name in ("A", "C", "B")
                   if self.has_variable("lora", name)} or None
        return adapted_linear(x.astype(self.dtype), kernel.astype(self.dtype), bias, adapter, self.lora_scale)


def scan_blocks(block: type[nn.Module], num_layers: int, in_axes: tuple = ()) -> type[nn.Module]:
    """``block`` under ``nn.scan`` over ``num_layers`` layers: its parameters and adapters
    (the ``lora`` collection) get a leading layer axis and each layer draws its own init and
    dropout keys. ``in_axes`` says, for each call argument after the carried hidden states,
    ``nn.broadcast`` (masks, flags: the same for every layer) or 0 (one slice per layer, e.g.
    a stacked key/value cache). The block returns ``(carry, per-layer output or None)``."""
    return nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=num_layers)


# How a block computes attention (``model.attention``): our einsums (the reference: exact HF
# parity, dropout on the attention probabilities), or ``jax.nn.dot_product_attention`` with
# XLA's implementation or cuDNN's fused flash attention (GPU, bfloat16/float16).
ATTENTION = ("einsum", "xla", "cudnn")


def check_attention(implementation: str) -> None:
    """Raises ``ValueError`` unless ``implementation`` is one of :data:`ATTENTION` (the model
    configs' ``attention`` field)."""
    if implementation not in ATTENTION:
        raise ValueError(f"attention must be one of {list(ATTENTION)}, got {implementation!r}")


def fused_attention(query: Array, key: Array, value: Array, mask: Array | None, implementation: str) -> Array:
    """``softmax(q kᵀ / √H) v`` through ``jax.nn.dot_product_attention``.

    ``query: [B, T, N, H]``, ``key``/``value: [B, S, K, H]`` with N a multiple of K (grouped
    queries), ``mask``: boolean, True where a query may attend, broadcastable to
    ``[B, 1, T, S]``, or None. The softmax runs in float32 whatever the inputs' dtype. It has
    no dropout on the attention probabilities: ``nn.Dropout`` cannot reach inside the fused
    kernel, so a model's attention dropout is not applied on this path."""
    if implementation not in ATTENTION[1:]:
        raise ValueError(f"fused attention implementation must be one of {list(ATTENTION[1:])}, "
                         f"got {implementation!r}")
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)


def rematerialized(block: type[nn.Module], remat: bool, static_argnums: tuple[int, ...] = (),
                   scanned: bool = False) -> type[nn.Module]:
    """``block`` whose activations are recomputed in the backward pass instead of kept
    (``model.remat``): training memory for activations drops from every block's to one
    block's, at the price of a second forward pass. ``static_argnums`` counts ``self`` as 0
    (Python values such as ``deterministic``). Under ``nn.scan`` the scan already stops XLA
    from merging the recomputation with the forward pass, so CSE prevention is off there."""
    if not remat:
        return block
    return nn.remat(block, static_argnums=static_argnums, prevent_cse=not scanned)
