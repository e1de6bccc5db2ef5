"""FedSA-LoRA: A (general knowledge) averaged, B (client-specific) kept personal."""

from __future__ import annotations

from celora_jax.federated.methods.base import FederatedMethod
from celora_jax.lora import adapters


def make() -> FederatedMethod:
    return FederatedMethod(
        name="fedsa_lora", description="FedSA-LoRA: A averaged, B personal",
        adapter_kind=adapters.LORA, trained=frozenset("AB"), shared=frozenset("A"))
