"""FedAvg-LoRA + local fine-tuning: FedAvg-LoRA whose clients, after each download, take a
few personal steps and are evaluated with the result, the personalization baseline that
papers call hard to beat (e.g. Yu et al., 2020, "Salvaging federated learning by local
adaptation"). The next round trains on from the download, not from the fine-tuned copy, so
the common model is FedAvg-LoRA's.

    celora-jax run --methods fedavg_lora_ft --set federation.method_options.fedavg_lora_ft.steps=4
"""

from __future__ import annotations

import dataclasses

from celora_jax.federated.methods import fedavg_lora
from celora_jax.federated.methods.base import FederatedMethod


def make(steps: int = 2) -> FederatedMethod:
    """``steps`` personal fine-tuning steps (on the round's first batches) after each download."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return dataclasses.replace(
        fedavg_lora.make(), name="fedavg_lora_ft",
        description=f"FedAvg-LoRA + {steps} local fine-tuning steps before evaluation",
        finetune_steps=steps, options={"steps": steps})
