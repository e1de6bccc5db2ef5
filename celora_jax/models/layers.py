"""Layers shared by our Flax models."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from celora_jax.adapters import adapted_linear

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
