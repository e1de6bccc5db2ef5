"""Analytic FLOPs of one client's training step of the encoder classifier: the numerator of MFU.

XLA's cost analysis is a poor numerator: on GPUs it undercounts (fused and custom-call
kernels such as cuDNN attention report no or partial FLOPs) and it counts elementwise work
and any recomputation of remat. MFU (model FLOPs utilization) counts the matrix products
the step must do, whatever the program recomputes, divided by the seconds it takes and the
device's peak. For a tri-LoRA encoder step with the default roles (adapters, every
LayerNorm and the head trained, the rest frozen), per example of ``T`` tokens:

* frozen linears (q, k, v, attention output, intermediate, output of every block):
  ``2·T·d_in·d_out`` forward, the same again for the input gradient, no weight gradient:
  2x the forward. The embeddings' LayerNorm is trained, so the gradient reaches the first
  block's inputs and every frozen linear needs its input gradient.
* attention: ``q kᵀ`` and ``P v``, ``2·T²·d`` each forward (padding positions included:
  they are computed, then masked); four products of the same size backward: 3x.
* adapters: ``x A``, ``(xA) C``, ``(xAC) B``, ``2·T·(d_in·r + r² + r·d_out)`` forward
  (without ``C`` for two-factor LoRA); input and weight gradients backward: 3x.
* the head (and the pooler when ``pooling="pooler"``): once per example, 3x.

Elementwise work (softmax, GELU, LayerNorm, the optimizer) is left out, as MFU conventions
do. ``tests/test_flops.py`` checks the count against the matrix products JAX traces for
the same step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

FORWARD, BACKWARD_FROZEN, BACKWARD_TRAINED = 1, 1, 2  # multiples of a product's forward FLOPs


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs of one training step by kind of product; ``train`` adds the backward pass."""

    frozen_linears: float
    attention: float
    adapters: float
    head: float

    @property
    def forward(self) -> float:
        return self.frozen_linears + self.attention + self.adapters + self.head

    @property
    def train(self) -> float:
        frozen = self.frozen_linears * (FORWARD + BACKWARD_FROZEN)
        return frozen + (self.attention + self.adapters + self.head) * (FORWARD + BACKWARD_TRAINED)


def adapter_parameters(adapters: Mapping[str, Any]) -> int:
    """Entries of every A, C and B in an adapter tree (stacked layers included): each is one
    multiply-add per token in the forward pass."""
    total = 0
    for name, value in adapters.items():
        if isinstance(value, Mapping):
            total += adapter_parameters(value)
        elif name in ("A", "C", "B"):
            total += math.prod(value.shape)
    return total


def encoder_step_flops(config, batch: int, length: int, adapters: Mapping[str, Any], num_labels: int,
                       pooling: str = "mean") -> StepFlops:
    """FLOPs of one training step on ``batch`` examples of ``length`` tokens.

    Args:
      config: the encoder's ``celora_jax.models.bert.EncoderConfig``.
      adapters: one client's adapter tree (``{..."A", "C", "B"}``), which says which linears
        are adapted and at what rank; every adapted linear is one of the blocks', applied
        to every token.
      num_labels: classes of the head.
      pooling: "pooler" adds the pooler's ``d x d`` product per example.
    """
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
    tokens = batch * length
    frozen = 2 * tokens * layers * (4 * d * d + 2 * d * f)
    attention = 2 * batch * layers * 2 * length * length * d
    head = 2 * batch * d * (num_labels + (d if pooling == "pooler" else 0))
    return StepFlops(float(frozen), float(attention), float(2 * tokens * adapter_parameters(adapters)), float(head))
