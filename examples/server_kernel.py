"""Run CE-LoRA's personalized server step on your own uploaded cores, without the engine.

Plain arrays in, plain arrays out: each client's features give a per-class Gaussian mixture
(sent once), the server turns them into a data distance; every round it takes the cores
``[N, L, r, r]`` and returns the weights W ``[N, N]`` and each client's mixture of cores.

Run (CPU, a few seconds)::

    .venv/bin/python examples/server_kernel.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax import AggregationConfig, data_distance, fit_class_mixtures, server_step

CLIENTS, LAYERS, RANK, EXAMPLES, DIM, CLASSES = 6, 4, 8, 60, 16, 2


def main() -> None:
    rng = np.random.default_rng(0)
    # Two groups of clients: mostly class 0 (clients 0-2) and mostly class 1 (clients 3-5).
    labels = np.stack([rng.random(EXAMPLES) < (0.1 if i < 3 else 0.9) for i in range(CLIENTS)]).astype(np.int32)
    features = rng.normal(size=(CLIENTS, EXAMPLES, DIM)) + 2.0 * labels[..., None]
    stats = fit_class_mixtures(jnp.asarray(features, jnp.float32), jnp.asarray(labels), None, CLASSES,
                               jax.random.key(0))
    distance = data_distance(stats)  # [N, N], once

    # The cores each client uploads this round: identity plus a group-specific update.
    direction = rng.normal(size=(2, LAYERS, RANK, RANK))
    cores = np.stack([np.eye(RANK) + 0.1 * direction[i // 3] + 0.01 * rng.normal(size=(LAYERS, RANK, RANK))
                      for i in range(CLIENTS)]).astype(np.float32)
    sizes = jnp.full((CLIENTS,), float(EXAMPLES))
    reported = jnp.array([True, True, True, True, True, False])  # client 5 dropped out

    out = server_step(jnp.asarray(cores), None, sizes, reported, AggregationConfig(beta=0.5, lam=1.0),
                      data_distance=distance)
    np.set_printoptions(precision=2, suppress=True)
    print("weights W (rows: receiving client):\n", np.asarray(out.weights))
    in_group = [float(out.weights[i, (i // 3) * 3:(i // 3) * 3 + 3].sum()) for i in range(CLIENTS - 1)]
    print("weight mass inside own group:", np.round(in_group, 2))
    print("personalized cores:", out.mixed_cores.shape)
    assert min(in_group) > 0.8, "clients should mostly mix with their own group"
    assert float(out.weights[:, 5][:5].max()) == 0.0, "the absent client is in no mixture"


if __name__ == "__main__":
    main()
