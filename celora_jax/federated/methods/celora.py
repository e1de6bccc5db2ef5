"""CE-LoRA (METHOD.md §1-5): tri-matrix adapters, only the cores travel, and the server
answers every client with its own mixture of cores under learned weights W.

Once, before round 1, every client uploads its data statistic (per-class Gaussian
mixtures of frozen features, ``celora_jax.federated.statistics``); the server turns them
into the data distance. Each round it stacks the uploaded cores, computes the parameter
distance, learns W (``celora_jax.server.aggregation.server_step``) and returns C̃_i = Σ_j W_ij C_j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.federated import strategies
from celora_jax.federated.methods.base import FederatedMethod, ServerInputs, core_share_logs
from celora_jax.lora import cores
from celora_jax.lora.adapters import TRI
from celora_jax.server import aggregation, similarity


def personalized_strategy(data_distance: np.ndarray, config: aggregation.AggregationConfig,
                          core_origin: np.ndarray | None = None) -> strategies.Strategy:
    """Personalized mixtures of cores with learned weights (METHOD.md §4-5).

    Args:
      data_distance: ``[N, N]`` squared MMD between the clients' statistics; clients
        beyond N (mesh padding) get zero rows and are always masked.
      config: β, λ and the other aggregation options.
      core_origin: ``[L, r, r]`` the cores every client started from (the parameter
        distance compares the updates C_i − C⁰); None = the identity.

    Uploads must hold the cores under ``"lora"``; any other shared leaves (only with
    ``federation.share_base``) are mixed with the same weights W. The data distance is
    constant, so it is logged once (``data_distance`` in round 1's logs only).

    With ``config.update_since == "received"`` the state also holds ``received``, ``[N, L,
    r, r]``: the core each client was last sent (C⁰ before its first accepted upload), the
    origin of its next update. Only clients in ``mask`` (those whose upload was accepted,
    the ones that take their download) move it, so the simulator and the server node, which
    pass the same mask, keep the same state; ``restart`` puts a client's row back to C⁰.
    """

    since_received = config.update_since == "received"

    def start(stacked):
        """``[N, L, r, r]``: the core every client started from, per client."""
        one = (jnp.broadcast_to(jnp.eye(stacked.shape[-1], dtype=stacked.dtype), stacked.shape[1:])
               if core_origin is None else jnp.asarray(core_origin, stacked.dtype))
        return jnp.broadcast_to(one, stacked.shape)

    def init(uploads, sizes):
        n_pad = sizes.shape[0]
        padded = np.zeros((n_pad, n_pad), np.float32)
        padded[: data_distance.shape[0], : data_distance.shape[0]] = data_distance
        state = {"data_distance": jnp.asarray(padded)}
        if since_received:
            # Only then: a run's server state (and its checkpoints) is unchanged otherwise.
            state["received"] = start(cores.stack_cores(uploads["lora"]))
        return state

    def aggregate(state, uploads, sizes, mask):
        stacked = cores.stack_cores(uploads["lora"])  # [N, L, r, r]
        origin = state["received"] if since_received else core_origin
        out = aggregation.server_step(stacked, None, sizes, mask, config, data_distance=state["data_distance"],
                                      core_origin=origin)
        if since_received:
            state = {**state, "received": jnp.where(mask[:, None, None, None], out.mixed_cores, state["received"])}
        lora = cores.unstack_cores(uploads["lora"], out.mixed_cores)
        others = {k: v for k, v in uploads.items() if k != "lora"}
        mixed_others = jax.tree.map(lambda leaf: jnp.tensordot(out.weights, leaf, axes=1), others)
        logs = {"weights": out.weights, "param_distance": out.param_distance, "excluded": out.excluded}
        return state, {"lora": lora, **mixed_others}, logs

    def initial_logs(state):
        # As server_step reports it: entries of clients with unusable statistics shown as 0.
        distance = state["data_distance"]
        return {"data_distance": jnp.where(jnp.isfinite(distance), distance, 0.0)}

    def restart(state, mask):
        # A client that starts again from C⁰ measures its next update from there.
        if not since_received:
            return state
        received = state["received"]
        return {**state, "received": jnp.where(mask[:, None, None, None], start(received), received)}

    return strategies.Strategy("celora_personalized", init, aggregate, initial_logs, restart)


def server(inputs: ServerInputs) -> strategies.Strategy:
    if inputs.data_statistics is None:
        raise ValueError("celora: the personalized server needs the clients' data statistics")
    config = inputs.aggregation
    distance = np.asarray(similarity.data_distance(inputs.data_statistics, config.bandwidth_sq, config.mmd_block_clients,
                                                   class_conditional=config.data_distance == "class_conditional"))
    return personalized_strategy(distance, inputs.aggregation, inputs.core_origin)


def make() -> FederatedMethod:
    return FederatedMethod(
        name="celora",
        description="CE-LoRA: tri-matrix adapters, personalized mixtures of cores",
        adapter_kind=TRI, trained=frozenset("ACB"), shared=frozenset("C"),
        server=server, needs_data_statistics=True, client_logs=core_share_logs)
