"""Local-only training: LoRA trained on each client, nothing sent (the lower bound every
federated method must beat)."""

from __future__ import annotations

from celora_jax.federated import strategies
from celora_jax.federated.methods.base import FederatedMethod
from celora_jax.lora import adapters


def make() -> FederatedMethod:
    return FederatedMethod(
        name="local", description="local-only: LoRA trained on each client, nothing sent",
        adapter_kind=adapters.LORA, trained=frozenset("AB"), shared=frozenset(),
        server=lambda inputs: strategies.local_only())
