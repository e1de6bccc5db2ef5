"""CE-LoRA's personalized server strategy (METHOD.md §3–5) wired into the engine.

Once, before round 1, every client embeds its training examples with the frozen
pre-trained encoder and fits a per-class diagonal Gaussian mixture (``celora_jax.gmm``);
the server turns those statistics into the data distance matrix. Every round the server
stacks the uploaded cores, computes the parameter distance, learns the personalized
weights W and returns each client its own mixture of cores (``celora_jax.aggregation``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax import adapters, aggregation, gmm, methods, sharding, similarity
from celora_jax.federated import strategies

if TYPE_CHECKING:
    from celora_jax.federated.engine import FederatedSetup

logger = logging.getLogger(__name__)


def client_features(setup: "FederatedSetup", chunk_size: int = 64) -> np.ndarray:
    """Frozen pre-trained features ``[n_local, n_train, hidden]`` of the training examples
    of this process's clients (all clients with one process; ``setup.embed_fn``: the
    model's own pooling, no adapters, no fine-tuning)."""
    params = methods.combine(setup.base_params, setup.client_params["params"])
    # The weights are an argument, not a closure: closed-over arrays would be baked into the
    # compiled program as constants.
    embed = jax.jit(setup.embed_fn)

    start, stop = setup.local_range
    inputs = [setup.train[name][start:stop] for name in setup.embed_inputs]
    clients, examples = inputs[0].shape[:2]
    flat = [x.reshape(-1, *x.shape[2:]) for x in inputs]
    total = flat[0].shape[0]
    padded = max(-(-total // chunk_size), 1) * chunk_size
    flat = [np.concatenate([x, np.zeros((padded - total, *x.shape[1:]), x.dtype)]) for x in flat]
    outputs = [np.asarray(embed(params, *[x[i:i + chunk_size] for x in flat]))
               for i in range(0, padded, chunk_size)]
    # The hidden size is explicit: a process holding only padding clients has total = 0.
    return np.concatenate(outputs)[:total].reshape(clients, examples, outputs[0].shape[-1])


def client_statistics(setup: "FederatedSetup") -> gmm.ClassMixtures:
    """The once-uploaded data statistic of every client. Each process fits its own
    clients' statistics; they are then gathered, as the server would receive them."""
    start, stop = setup.local_range
    features = client_features(setup)
    key = jax.random.fold_in(jax.random.key(setup.config.seed), 2)
    local = gmm.fit_class_mixtures(jnp.asarray(features), jnp.asarray(setup.train["labels"][start:stop]),
                                   jnp.asarray(setup.train["example_mask"][start:stop] > 0),
                                   setup.num_classes, key, first_client=start)
    return sharding.gather_client_rows(local, start, setup.num_clients)


def celora_strategy(setup: "FederatedSetup") -> strategies.Strategy:
    """CE-LoRA for a prepared run: fits the clients' statistics, then ``personalized``."""
    stats = client_statistics(setup)
    return personalized(np.asarray(similarity.data_distance(stats)), setup.config.aggregation)


def personalized(data_distance: np.ndarray, config: aggregation.AggregationConfig) -> strategies.Strategy:
    """Personalized mixtures of cores with learned weights (CE-LoRA, METHOD.md §4–5).

    Args:
      data_distance: ``[N, N]`` squared MMD between the clients' statistics, computed
        once; clients beyond N (mesh padding) get zero rows and are always masked.
      config: β, λ and the other aggregation options.

    Uploads must hold the cores under ``"lora"``; any other shared leaves (only with
    ``federation.share_base``) are mixed with the same weights W.
    """

    def init(uploads, sizes):
        n_pad = sizes.shape[0]
        padded = np.zeros((n_pad, n_pad), np.float32)
        padded[: data_distance.shape[0], : data_distance.shape[0]] = data_distance
        return {"data_distance": jnp.asarray(padded)}

    def aggregate(state, uploads, sizes, mask):
        cores = adapters.stack_cores(uploads["lora"])  # [N, L, r, r]
        out = aggregation.server_step(cores, None, sizes, mask, config, data_distance=state["data_distance"])
        lora = adapters.unstack_cores(uploads["lora"], out.mixed_cores)
        others = {k: v for k, v in uploads.items() if k != "lora"}
        mixed_others = jax.tree.map(lambda leaf: jnp.tensordot(out.weights, leaf, axes=1), others)
        logs = {"weights": out.weights, "data_distance": out.data_distance,
                "param_distance": out.param_distance, "excluded": out.excluded}
        return state, {"lora": lora, **mixed_others}, logs

    return strategies.Strategy("celora_personalized", init, aggregate)
