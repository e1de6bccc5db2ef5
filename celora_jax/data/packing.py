"""Fixed-shape client arrays, so that one compiled program serves every round.

Shapes (N clients, S local steps, B batch, T tokens):
  round batches: ``input_ids``/``attention_mask`` ``[N, S, B, T]``, ``labels`` and
  ``example_mask`` ``[N, S, B]``; evaluation sets: ``[N, n, T]`` and ``[N, n]``.
"""

from __future__ import annotations

import numpy as np

# A batch pytree: {"input_ids", "attention_mask", "labels", "example_mask"}.
Batch = dict


def gather_examples(encoded: dict, labels: np.ndarray, indices: np.ndarray) -> Batch:
    """Client-stacked examples ``indices [N, n]`` from tokenized data ``encoded [M, ...]``
    (every field of ``encoded``, e.g. instruction targets, is gathered the same way)."""
    return {
        **{name: value[indices] for name, value in encoded.items()},
        "labels": labels[indices].astype(np.int32),
        "example_mask": np.ones(indices.shape, np.float32),
    }


def round_batches(examples: Batch, steps: int, batch_size: int, seed: int, round_index: int,
                  first_client: int = 0) -> Batch:
    """Each client's training batches for one round ``[N, S, B, ...]``.

    Every client walks through reshuffled epochs of its own examples; the order depends only
    on (seed, round, client), so a resumed run sees exactly the batches it would have seen,
    and a node holding only client ``first_client``'s rows (a deployment) the batches the
    simulator would give that client.
    """
    num_clients, num_examples = examples["labels"].shape
    needed = steps * batch_size
    order = np.empty((num_clients, needed), np.int64)
    for client in range(num_clients):
        rng = np.random.default_rng((seed, round_index, first_client + client))
        epochs = -(-needed // num_examples)
        order[client] = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])[:needed]
    rows = np.arange(num_clients)[:, None]
    return {name: value[rows, order].reshape(num_clients, steps, batch_size, *value.shape[2:])
            for name, value in examples.items()}


def pad_clients(tree: Batch, total: int) -> Batch:
    """Appends masked (all-zero) clients along axis 0 up to ``total`` clients."""
    def pad(value):
        extra = total - value.shape[0]
        if extra < 0:
            raise ValueError(f"cannot pad {value.shape[0]} clients down to {total}")
        return np.concatenate([value, np.zeros((extra, *value.shape[1:]), value.dtype)])
    return {name: pad(value) for name, value in tree.items()}
