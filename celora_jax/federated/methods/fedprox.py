"""FedProx (Li et al., 2020): FedAvg-LoRA whose clients minimize the task loss plus a
proximal term (μ/2)·||θ − θ_download||² over the shared leaves, which keeps local training
of heterogeneous clients close to the common model. Only the client objective differs
from FedAvg-LoRA; the server, the roles and the bytes are the same.

    celora-jax run --methods fedprox --set federation.method_options.fedprox.mu=0.1
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from celora_jax.federated.methods import fedavg_lora
from celora_jax.federated.methods.base import FederatedMethod
from celora_jax.lora import roles as roles_lib


def proximal_objective(mu: float):
    """Wraps a client loss with (μ/2)·||shared − shared at the round's start||²."""

    def objective(loss_fn, roles):
        def loss(trained, anchor, *rest):
            value, aux = loss_fn(trained, anchor, *rest)
            now = jax.tree.leaves(roles_lib.select(trained, roles, roles_lib.SHARED))
            then = jax.tree.leaves(roles_lib.select(anchor, roles, roles_lib.SHARED))
            distance = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(now, then))
            return value + 0.5 * mu * distance, aux

        return loss

    return objective


def make(mu: float = 0.01) -> FederatedMethod:
    """FedProx with proximal weight ``mu`` (μ = 0 is FedAvg-LoRA)."""
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    return dataclasses.replace(
        fedavg_lora.make(), name="fedprox",
        description=f"FedProx: FedAvg-LoRA with a proximal term (mu={mu:g}) in the client loss",
        client_objective=proximal_objective(float(mu)), options={"mu": float(mu)})
