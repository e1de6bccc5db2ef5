"""A toy federated task with no assets: a linear classifier over float features, adapted by
tri-LoRA or LoRA on its one kernel, with a personal per-class scale as the client-trained
base. Small enough that every registered method compiles and runs in seconds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.data.partition import PartitionConfig
from celora_jax.federated.config import FederationConfig, RunConfig
from celora_jax.federated.setup import Setup, adapter_config_for, resolve_method, setup_for
from celora_jax.federated.tasks import Task
from celora_jax.federated.tasks.base import hold_out_validation
from celora_jax.lora import adapters

DIM, CLASSES = 8, 3


def toy_config(method: str, num_clients: int = 6, **federation) -> RunConfig:
    fed = {"rounds": 2, "batch_size": 4, "eval_batch_size": 4, "client_block": None, **federation}
    return RunConfig(
        name="toy",
        adapter=adapters.AdapterConfig(kind=None, rank=2, target=r"dense/kernel$", a_init_std=0.3),
        partition=PartitionConfig(num_clients=num_clients, train_examples=8, test_examples=4,
                                  global_test_examples=4),
        federation=FederationConfig(method=method, **fed))


def benchmark_config() -> RunConfig:
    """The toy run ``benchmarks/flower_vs_engine.py --config-factory toy:benchmark_config``
    times: CE-LoRA over 4 clients."""
    return toy_config("celora", num_clients=4)


def _examples(rng, num_clients: int, count: int, rules: np.ndarray) -> dict:
    features = rng.normal(size=(num_clients, count, DIM)).astype(np.float32)
    labels = np.einsum("nkd,ndc->nkc", features, rules).argmax(-1).astype(np.int32)
    return {"features": features, "labels": labels, "example_mask": np.ones((num_clients, count), np.float32)}


def toy_task(config: RunConfig, adapter_config: adapters.AdapterConfig, seed: int = 0) -> Task:
    """Clients in two groups (the true clusters, even and odd clients) with different
    labelling rules, so that mixing matters."""
    rng = np.random.default_rng(seed)
    n, part = config.partition.num_clients, config.partition
    group_rules = rng.normal(size=(2, DIM, CLASSES))
    rules = group_rules[np.arange(n) % 2] + 0.3 * rng.normal(size=(n, DIM, CLASSES))
    params = {"dense": {"kernel": jnp.asarray(0.1 * rng.normal(size=(DIM, CLASSES)), jnp.float32),
                        "bias": jnp.zeros(CLASSES)},
              "head": {"scale": jnp.ones(CLASSES)}}
    lora = adapters.init_adapters(jax.random.key(config.seed), params, adapter_config)
    scale = adapter_config.scale

    def logits_fn(full_params, lora_params, batch, dropout_key):
        x = batch["features"]
        if dropout_key is not None:
            x = x * jax.random.bernoulli(dropout_key, 0.9, x.shape) / 0.9
        dense = full_params["dense"]
        y = adapters.adapted_linear(x, dense["kernel"], dense["bias"], lora_params.get("dense"), scale)
        return y * full_params["head"]["scale"]

    def embed_fn(full_params, features):
        return features.astype(jnp.float32)

    train = _examples(rng, n, part.train_examples, rules)
    train, validation = hold_out_validation(train, part.validation_examples)
    test = _examples(rng, n, part.test_examples, rules)
    global_test = {k: v[0] for k, v in _examples(rng, 1, part.global_test_examples, rules[:1]).items()}
    return Task(logits_fn, embed_fn, ("features",), {"dense": params["dense"]},
                {"lora": lora, "params": {"head": params["head"]}}, adapter_config, train, test, global_test,
                CLASSES, (0, n), "toy", clusters=np.arange(n) % 2, validation=validation)


def toy_setup(config: RunConfig) -> Setup:
    method = resolve_method(config)
    return setup_for(config, method, toy_task(config, adapter_config_for(config, method)))


def with_federation(config: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(config, federation=dataclasses.replace(config.federation, **changes))
