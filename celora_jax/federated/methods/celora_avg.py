"""CE-LoRA without personalization (the ablation of METHOD.md §5): tri-matrix adapters,
only the cores travel, and every client receives their size-weighted average."""

from __future__ import annotations

from celora_jax.federated.methods.base import FederatedMethod, core_share_logs
from celora_jax.lora import adapters


def make() -> FederatedMethod:
    return FederatedMethod(
        name="celora_avg",
        description="CE-LoRA without personalization: cores averaged with weights n_i/n",
        adapter_kind=adapters.TRI, trained=frozenset("ACB"), shared=frozenset("C"),
        client_logs=core_share_logs)
