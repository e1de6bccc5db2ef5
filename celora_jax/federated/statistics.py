"""The client side of CE-LoRA's data similarity (METHOD.md §3): each client embeds its
training examples with the frozen pre-trained model and fits a per-class diagonal Gaussian
mixture. That statistic is the client's round-0 upload; the server only ever sees it (and
the cores), never the model or the examples.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.federated import sharding
from celora_jax.server import gmm


def client_features(embed_fn: Callable, params: Mapping, inputs: list[np.ndarray],
                    chunk_size: int = 64) -> np.ndarray:
    """Frozen features ``[clients, examples, hidden]`` of client-stacked ``inputs``
    (each ``[clients, examples, ...]``, the arguments of ``embed_fn`` after ``params``)."""
    # The weights are an argument, not a closure: closed-over arrays would be baked into the
    # compiled program as constants.
    embed = jax.jit(embed_fn)
    clients, examples = inputs[0].shape[:2]
    flat = [x.reshape(-1, *x.shape[2:]) for x in inputs]
    total = flat[0].shape[0]
    padded = max(-(-total // chunk_size), 1) * chunk_size
    flat = [np.concatenate([x, np.zeros((padded - total, *x.shape[1:]), x.dtype)]) for x in flat]
    outputs = [np.asarray(embed(params, *[x[i:i + chunk_size] for x in flat]))
               for i in range(0, padded, chunk_size)]
    # The hidden size is explicit: a process holding only padding clients has total = 0.
    return np.concatenate(outputs)[:total].reshape(clients, examples, outputs[0].shape[-1])


def client_statistics(embed_fn: Callable, params: Mapping, train: Mapping[str, np.ndarray],
                      embed_inputs: tuple[str, ...], num_classes: int, local_clients: tuple[int, int],
                      num_clients: int, key: jax.Array) -> gmm.ClassMixtures:
    """Every client's data statistic, stacked over all ``num_clients`` clients.

    Each process fits the statistics of its own clients ``local_clients = [start, stop)``
    (rows of ``train``); they are then gathered, as the server would receive them.

    Args:
      embed_fn: ``embed_fn(params, *inputs) -> [B, D]`` frozen features.
      params: the full model parameters (frozen base with the client-trained base subset
        at its initial value: the same for every client).
      train: client-stacked training examples ``[N, n, ...]`` with ``labels`` and
        ``example_mask``.
      embed_inputs: the entries of ``train`` that embed_fn takes.
      key: PRNG key of the mixture fits.
    """
    start, stop = local_clients
    features = client_features(embed_fn, params, [train[name][start:stop] for name in embed_inputs])
    local = gmm.fit_class_mixtures(jnp.asarray(features), jnp.asarray(train["labels"][start:stop]),
                                   jnp.asarray(train["example_mask"][start:stop] > 0),
                                   num_classes, key, first_client=start)
    return sharding.gather_client_rows(local, start, num_clients)
