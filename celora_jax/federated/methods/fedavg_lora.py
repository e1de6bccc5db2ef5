"""FedIT / FedAvg-LoRA: both LoRA factors trained and averaged with weights n_i / n."""

from __future__ import annotations

from celora_jax.federated.methods.base import FederatedMethod
from celora_jax.lora import adapters


def make() -> FederatedMethod:
    return FederatedMethod(
        name="fedavg_lora", description="FedIT / FedAvg-LoRA: A and B averaged",
        adapter_kind=adapters.LORA, trained=frozenset("AB"), shared=frozenset("AB"))
