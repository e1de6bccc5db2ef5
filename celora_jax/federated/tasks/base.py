"""What every task (encoder, decoder, VLM) hands the federated loop, and the host-side
steps they share: which clients this process holds, which dataset rows it encodes, and
how examples and parameters are stacked over clients."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import numpy as np
from flax import traverse_util

from celora_jax._checks import ConfigError
from celora_jax.data import packing
from celora_jax.data.partition import GROUP_SCHEMES, partition
from celora_jax.data.text import DataError
from celora_jax.federated import sharding
from celora_jax.federated.config import RunConfig
from celora_jax.lora import adapters as adapters_lib


@dataclasses.dataclass(frozen=True)
class Task:
    """A loaded model and its clients' encoded data (numpy or unsharded jax arrays).

    Attributes:
      logits_fn: ``logits_fn(full_params, lora, batch, dropout_key or None) -> logits``.
      embed_fn: ``embed_fn(full_params, *[batch[name] for name in embed_inputs]) -> [B, D]``
        float32: the frozen pre-trained features each client summarizes for the data
        distance (METHOD.md §3).
      embed_inputs: the batch entries embed_fn takes.
      base_params: frozen base parameters, one copy shared by all clients.
      client_params: one client's initial ``{"lora": adapters, "params": trained base}``.
      adapter_config: the adapters as attached (the decoder's default targets filled in).
      train, test: ``[N, n, ...]`` per entry; rows of clients other processes hold are zeros.
      validation: ``[N, n_val, ...]``, each client's held-out training examples
        (``partition.validation_fraction``; ``n_val`` = 0 when none are held out).
      global_test: ``[n_global, ...]``, a common test set every client is also scored on.
      num_classes: labels of the task.
      local_clients: clients ``[start, stop)`` whose examples this process loaded.
      clusters: ``[N]`` every client's true cluster (``ClientSplit.clusters``), which only
        reference methods such as the cluster oracle may read.
      base_model: the base checkpoint's path, recorded in exported PEFT folders.
      preparation: what preparation measured that the summary reports (the VLM's
        projector alignment).
    """

    logits_fn: Callable
    embed_fn: Callable
    embed_inputs: tuple[str, ...]
    base_params: dict
    client_params: dict
    adapter_config: adapters_lib.AdapterConfig
    train: dict
    test: dict
    global_test: dict
    num_classes: int
    local_clients: tuple[int, int]
    base_model: str
    clusters: np.ndarray | None = None
    preparation: dict = dataclasses.field(default_factory=dict)
    validation: dict | None = None

    @property
    def has_validation(self) -> bool:
        return self.validation is not None and self.validation["example_mask"].shape[1] > 0

    @property
    def num_clients(self) -> int:
        return int(self.train["example_mask"].shape[0])

    @property
    def sizes(self) -> np.ndarray:
        """``[N]`` training examples per client."""
        return self.train["example_mask"].sum(1).astype(np.float32)


def split_base_params(params: dict, trainable_regex: str) -> tuple[dict, dict]:
    """(frozen, client-trained) parts of the base parameters by path regex."""
    pattern = re.compile(trainable_regex)
    flat = traverse_util.flatten_dict(params)
    trained = {p: v for p, v in flat.items() if pattern.search("/".join(p))}
    frozen = {p: v for p, v in flat.items() if p not in trained}
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(trained)


def client_parameters(params: dict, config: RunConfig, adapter_config: adapters_lib.AdapterConfig,
                      key_adapter: jax.Array) -> tuple[dict, dict]:
    """(frozen base params, one client's initial parameters ``{"lora", "params"}``)."""
    base_params, trained_base = split_base_params(params, config.model.trainable_base)
    # One key for every client: all start from the same A (METHOD.md §1).
    lora = adapters_lib.init_adapters(key_adapter, params, adapter_config)
    return base_params, {"lora": lora, "params": trained_base}


def process_clients(config: RunConfig) -> tuple[int, int]:
    """The real clients ``[start, stop)`` whose rows live on this process's devices."""
    fed = config.federation
    mesh = sharding.client_mesh(fed.num_devices, fed.data_parallel)
    total = sharding.padded_client_count(config.partition.num_clients, mesh, fed.client_block)
    start, stop = sharding.local_client_rows(mesh, total)
    num_clients = config.partition.num_clients
    return min(start, num_clients), min(stop, num_clients)


def split_clients(dataset, config: RunConfig):
    """``partition`` of a dataset (texts or images), with an error naming the group column when the
    scheme splits by groups the data does not have."""
    scheme, column = config.partition.scheme, config.data.group_column
    if scheme in GROUP_SCHEMES and dataset.groups is None:
        reason = "data.group_column is None" if column is None else f"the data has no column {column!r}"
        raise DataError(f"partition.scheme={scheme!r} splits clients by data.group_column, but {reason}")
    if scheme == "clustered_labels" and config.model.architecture not in ("encoder", "vit"):
        raise DataError("partition.scheme='clustered_labels' renames class ids per cluster, which only a "
                        "classification head (model.architecture='encoder' or 'vit') can learn; the "
                        f"{config.model.architecture!r} task answers with the class names")
    if scheme == "clustered_rotations" and config.model.architecture != "vit":
        raise DataError("partition.scheme='clustered_rotations' rotates each cluster's images, which needs "
                        f"the image classifier (model.architecture='vit'), not {config.model.architecture!r}")
    return partition(dataset.labels, config.partition, dataset.groups)


def needed_examples(split, clients: tuple[int, int]) -> np.ndarray:
    """Dataset rows this process must encode: its clients' examples and the global test."""
    start, stop = clients
    return np.unique(np.concatenate([split.train[start:stop].ravel(), split.test[start:stop].ravel(),
                                     split.global_test]))


def client_examples(encoded: dict, all_labels: np.ndarray, needed: np.ndarray, split,
                    clients: tuple[int, int], pooled_training: bool = False,
                    validation_examples: int = 0) -> tuple[dict, dict, dict, dict]:
    """Client-stacked train ``[N, n_train - n_val, ...]``, validation ``[N, n_val, ...]``,
    test ``[N, n_test, ...]`` and global test arrays from the examples ``encoded`` for the
    dataset rows ``needed``. Rows of clients outside ``clients`` (held by other processes)
    are zeros, with example_mask kept. The validation split is the last
    ``validation_examples`` of each client's (shuffled) training examples, as the client
    labels and sees them. ``pooled_training``: every client's train rows are all clients'
    train rows ``[N, N·n_train, ...]`` (``pool_clients``), its validation rows its own."""
    position = np.full(len(all_labels), -1, np.int64)
    position[needed] = np.arange(len(needed))
    labels = all_labels[needed]
    start, stop = clients

    def gather(indices):
        examples = packing.gather_examples(encoded, labels, position[indices])
        for name, value in examples.items():
            if name != "example_mask":
                value[:start] = 0
                value[stop:] = 0
        return examples

    train, test = gather(split.train), gather(split.test)
    if split.label_maps is not None:  # each client's own names for the classes (clustered_labels)
        rows = np.arange(len(split.label_maps))[:, None]
        train["labels"] = split.label_maps[rows, train["labels"]].astype(np.int32)
        test["labels"] = split.label_maps[rows, test["labels"]].astype(np.int32)
    if split.quarter_turns is not None:  # each client's own view of the images (clustered_rotations)
        for examples in (train, test):
            examples["images"] = rotate_clients(examples["images"], split.quarter_turns)
    train, validation = hold_out_validation(train, validation_examples)
    if pooled_training:
        if clients != (0, len(split.train)):
            raise DataError("partition.pooled_training gives every client all clients' training examples, "
                            f"so one process must hold every client; this one holds clients {start}..{stop - 1} "
                            f"of {len(split.train)}")
        train = pool_clients(train)
    global_test = packing.gather_examples(encoded, labels, position[split.global_test][None])
    return train, validation, test, {k: v[0] for k, v in global_test.items()}


def hold_out_validation(train: dict, validation_examples: int) -> tuple[dict, dict]:
    """(train, validation): the last ``validation_examples`` of each client's rows
    ``[N, n, ...]`` held out as its validation split, the rest kept to train on."""
    fit = train["example_mask"].shape[1] - validation_examples
    return {k: v[:, :fit] for k, v in train.items()}, {k: v[:, fit:] for k, v in train.items()}


def pool_clients(examples: dict) -> dict:
    """Every client's rows become the union of all clients' rows: ``[N, n, ...]`` ->
    ``[N, N·n, ...]``, client 0's examples first. Applied after the per-client label maps and
    rotations, so a pooled example keeps the label and view its owner gave it."""
    def pool(value):
        num_clients = value.shape[0]
        union = value.reshape(1, num_clients * value.shape[1], *value.shape[2:])
        return np.repeat(union, num_clients, axis=0)
    return {name: pool(value) for name, value in examples.items()}


def rotate_clients(images: np.ndarray, quarter_turns: np.ndarray) -> np.ndarray:
    """Client i's images ``[N, n, H, W(, C)]`` turned counter-clockwise by ``quarter_turns[i]``
    x 90 degrees (square images: the shape stays)."""
    return np.stack([np.rot90(client, int(turns), axes=(1, 2)) for client, turns in zip(images, quarter_turns)])


def block_options(config: RunConfig) -> dict:
    """``attention`` and ``remat`` for the model's architecture config (``model.attention``,
    ``model.remat``), checked against this process's backend before anything compiles."""
    if config.model.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention='cudnn' needs a CUDA GPU; this process's JAX backend is "
                          f"{jax.default_backend()!r} (model.attention='xla' runs everywhere)")
    return {"attention": config.model.attention, "remat": config.model.remat}


def compute_dtype(config: RunConfig):
    """The jnp dtype of ``model.dtype`` (validated by ``ModelConfig``)."""
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[config.model.dtype]
