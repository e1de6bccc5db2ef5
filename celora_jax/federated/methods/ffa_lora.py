"""FFA-LoRA: A frozen at its shared random init, only B trained and averaged (no
aggregation error: the average of A·B_i is A times the average of B_i)."""

from __future__ import annotations

from celora_jax.federated.methods.base import FederatedMethod
from celora_jax.lora import adapters


def make() -> FederatedMethod:
    return FederatedMethod(
        name="ffa_lora", description="FFA-LoRA: A frozen at its shared random init, B averaged",
        adapter_kind=adapters.LORA, trained=frozenset("B"), shared=frozenset("B"))
