"""The federated simulation: every client in one jitted, vmapped, sharded round step.

``prepare(config)`` does the host-side work once (data, partition, tokenization, model,
adapters, strategy); ``run(config)`` then loops over rounds, calling one compiled program
per round and evaluating every client on its own test split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from celora_jax import adapters as adapters_lib
from celora_jax import checkpoint, methods, sharding
from celora_jax.config import RunConfig, to_dict
from celora_jax.data import packing
from celora_jax.data.partition import partition
from celora_jax.data.text import load_text_dataset
from celora_jax.federated import align, blocks
from celora_jax.federated import client as client_lib
from celora_jax.federated import strategies
from celora_jax.models import loading
from celora_jax.privacy import dp as dp_lib

logger = logging.getLogger(__name__)

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class FederatedSetup:
    """Host-side state of a prepared run (arrays are numpy or unsharded jax arrays)."""

    config: RunConfig
    method: methods.MethodSpec
    adapter_config: adapters_lib.AdapterConfig
    model: Any
    logits_fn: Callable
    base_params: dict            # frozen, shared by all clients
    client_params: dict          # one client's initial trained/sent parameters
    roles: dict                  # role of every leaf of client_params
    train: dict                  # [N, n_train, ...]
    test: dict                   # [N, n_test, ...]
    global_test: dict            # [n_global, ...]
    num_clients: int
    local_steps: int
    num_classes: int
    # embed_fn(full_params, *[batch[name] for name in embed_inputs]) -> [B, D] float32: the
    # frozen pre-trained features each client summarizes for the data distance (METHOD.md §3).
    embed_fn: Callable | None = None
    # Clients [start, stop) whose examples this process loaded (all of them with one
    # process); the other rows of train/test are zeros with the right example_mask.
    local_clients: tuple[int, int] | None = None
    embed_inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    # What preparation measured that the summary reports (the VLM's projector alignment).
    preparation: dict = dataclasses.field(default_factory=dict)

    @property
    def local_range(self) -> tuple[int, int]:
        return self.local_clients or (0, self.num_clients)

    @property
    def sizes(self) -> np.ndarray:
        return self.train["example_mask"].sum(1).astype(np.float32)


def split_base_params(params: dict, trainable_regex: str) -> tuple[dict, dict]:
    """(frozen, client-trained) parts of the base parameters by path regex."""
    pattern = re.compile(trainable_regex)
    flat = traverse_util.flatten_dict(params)
    trained = {p: v for p, v in flat.items() if pattern.search("/".join(p))}
    frozen = {p: v for p, v in flat.items() if p not in trained}
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(trained)


def local_clients(config: RunConfig) -> tuple[int, int]:
    """The real clients ``[start, stop)`` whose rows live on this process's devices."""
    fed = config.federation
    mesh = sharding.client_mesh(fed.num_devices, fed.data_parallel)
    total = sharding.padded_client_count(config.partition.num_clients, mesh, fed.client_block)
    start, stop = sharding.local_client_rows(mesh, total)
    num_clients = config.partition.num_clients
    return min(start, num_clients), min(stop, num_clients)


def _needed_examples(split, clients: tuple[int, int]) -> np.ndarray:
    """Dataset rows this process must tokenize: its clients' examples and the global test."""
    start, stop = clients
    return np.unique(np.concatenate([split.train[start:stop].ravel(), split.test[start:stop].ravel(),
                                     split.global_test]))


def _client_examples(encoded: dict, all_labels: np.ndarray, needed: np.ndarray, split,
                     clients: tuple[int, int]) -> tuple[dict, dict, dict]:
    """Client-stacked train ``[N, n_train, ...]``, test ``[N, n_test, ...]`` and global test
    arrays from the examples ``encoded`` for the dataset rows ``needed``. Rows of clients
    outside ``clients`` (held by other processes) are zeros, with example_mask kept."""
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
    global_test = packing.gather_examples(encoded, labels, position[split.global_test][None])
    return train, test, {k: v[0] for k, v in global_test.items()}


def _local_steps(config: RunConfig) -> int:
    fed = config.federation
    return fed.local_steps or math.ceil(config.partition.train_examples / fed.batch_size)


def prepare(config: RunConfig, *, progress: bool = False) -> FederatedSetup:
    """Loads data and model, partitions clients and builds the initial client parameters
    (``progress``: a progress bar for long preparation, the VLM's projector alignment)."""
    method = methods.get_method(config.federation.method)
    adapter_config = dataclasses.replace(config.adapter, kind=method.adapter_kind)
    if config.model.dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {config.model.dtype!r}")
    if config.model.architecture == "decoder":
        return _prepare_decoder(config, method, adapter_config)
    if config.model.architecture == "vlm":
        return _prepare_vlm(config, method, adapter_config, progress)
    model_dir = loading.default_model_dir() if config.model.path is None else pathlib.Path(config.model.path)
    model_config = loading.read_encoder_config(model_dir)  # fails early on a bad directory

    dataset = load_text_dataset(config.data)
    split = partition(dataset.labels, config.partition, dataset.groups)
    tokenizer = loading.load_tokenizer(model_dir)
    clients = local_clients(config)
    needed = _needed_examples(split, clients)
    encoded = loading.encode_texts(tokenizer, [dataset.texts[i] for i in needed],
                                   config.model.max_length, model_config.pad_token_id)
    largest_id = int(encoded["input_ids"].max())
    if largest_id >= model_config.vocab_size:
        raise loading.ModelLoadError(
            f"the tokenizer of {model_dir} produced token id {largest_id} but the model's vocabulary "
            f"has {model_config.vocab_size} entries: tokenizer and model do not match")
    train, test, global_test = _client_examples(encoded, dataset.labels, needed, split, clients)

    key_model, key_adapter = jax.random.split(jax.random.key(config.seed))
    model, params = loading.load_classifier(
        model_dir, key_model, num_labels=dataset.num_classes, pooling=config.model.pooling,
        lora_scale=adapter_config.scale, dtype=_DTYPES[config.model.dtype])
    base_params, client_params, roles = _client_parameters(params, config, method, adapter_config, key_adapter)

    def logits_fn(full_params, lora_params, batch, dropout_key):
        variables = {"params": full_params, "lora": lora_params}
        if dropout_key is None:
            return model.apply(variables, batch["input_ids"], batch["attention_mask"])
        return model.apply(variables, batch["input_ids"], batch["attention_mask"],
                           deterministic=False, rngs={"dropout": dropout_key})

    from celora_jax.models.bert import BertModel, pool

    trunk = BertModel(model.config, dtype=model.dtype)
    summary = "first" if model.pooling != "mean" else "mean"

    def embed_fn(full_params, input_ids, attention_mask):
        hidden = trunk.apply({"params": full_params["backbone"]}, input_ids, attention_mask)
        return pool(hidden, attention_mask, summary).astype(jnp.float32)

    return FederatedSetup(config, method, adapter_config, model, logits_fn, base_params,
                          client_params, roles, train, test, global_test,
                          config.partition.num_clients, _local_steps(config), dataset.num_classes, embed_fn,
                          clients)


def _client_parameters(params: dict, config: RunConfig, method: methods.MethodSpec,
                       adapter_config: adapters_lib.AdapterConfig, key_adapter: jax.Array) -> tuple[dict, dict, dict]:
    """(frozen base params, one client's initial parameters {"lora", "params"}, their roles)."""
    base_params, trained_base = split_base_params(params, config.model.trainable_base)
    # One key for every client: all start from the same A (METHOD.md §1).
    lora = adapters_lib.init_adapters(key_adapter, params, adapter_config)
    client_params = {"lora": lora, "params": trained_base}
    roles = methods.parameter_roles(client_params, method, core_only=adapter_config.core_only,
                                    share_base=config.federation.share_base)
    return base_params, client_params, roles


def _load_decoder(config: RunConfig, adapter_config: adapters_lib.AdapterConfig):
    """(adapter config with the decoder's default targets, decoder config, params, tokenizer)."""
    from celora_jax.models import decoder_loading, llama

    if adapter_config.target == adapters_lib.DEFAULT_TARGET:
        adapter_config = dataclasses.replace(adapter_config, target=llama.DECODER_TARGET)
    model_config, params, tokenizer = decoder_loading.load_decoder(config.model.path)
    if tokenizer is None:
        raise loading.ModelLoadError(f"{config.model.path} has no tokenizer.json; the decoder needs one")
    return adapter_config, model_config, params, tokenizer


def _prepare_decoder(config: RunConfig, method: methods.MethodSpec,
                     adapter_config: adapters_lib.AdapterConfig) -> FederatedSetup:
    """``prepare`` for a Llama-family decoder: chats from the labelled texts, LM on answers."""
    from celora_jax.data import instructions
    from celora_jax.models import llama

    adapter_config, model_config, params, tokenizer = _load_decoder(config, adapter_config)

    dataset = load_text_dataset(config.data)
    split = partition(dataset.labels, config.partition, dataset.groups)
    clients = local_clients(config)
    needed = _needed_examples(split, clients)
    encoded = instructions.encode_instructions(
        tokenizer, [dataset.texts[i] for i in needed], dataset.labels[needed],
        instructions.answers_for(dataset.label_names), config.model.max_length, model_config.pad_token_id)
    train, test, global_test = _client_examples(encoded, dataset.labels, needed, split, clients)

    model = llama.LlamaForCausalLM(model_config, lora_scale=adapter_config.scale, dtype=_DTYPES[config.model.dtype])
    params = jax.tree.map(jnp.asarray, params)
    key_adapter = jax.random.split(jax.random.key(config.seed))[1]
    base_params, client_params, roles = _client_parameters(params, config, method, adapter_config, key_adapter)
    answer_positions = encoded["targets"].shape[1]

    def logits_fn(full_params, lora_params, batch, dropout_key):
        logits, _ = model.apply({"params": full_params, "lora": lora_params}, batch["input_ids"],
                                batch["attention_mask"], last=answer_positions)
        return logits

    def embed_fn(full_params, input_ids, attention_mask):
        hidden, _ = model.apply({"params": full_params}, input_ids, attention_mask, return_hidden=True)
        weights = attention_mask.astype(jnp.float32)[..., None]
        return (hidden * weights).sum(-2) / jnp.maximum(weights.sum(-2), 1.0)

    return FederatedSetup(config, method, adapter_config, model, logits_fn, base_params,
                          client_params, roles, train, test, global_test,
                          config.partition.num_clients, _local_steps(config), dataset.num_classes, embed_fn,
                          clients)


def _prepare_vlm(config: RunConfig, method: methods.MethodSpec,
                 adapter_config: adapters_lib.AdapterConfig, progress: bool = False) -> FederatedSetup:
    """``prepare`` for a LLaVA-style model: a question about each image, answered in words."""
    from celora_jax.data import images as images_lib
    from celora_jax.data import instructions
    from celora_jax.models import vision_loading, vlm

    adapter_config, model_config, decoder_params, tokenizer = _load_decoder(config, adapter_config)
    vision_config, vision_params = vision_loading.load_vision(config.model.vision_path)

    dataset = images_lib.load_fashion_mnist(config.data.path)
    split = partition(dataset.labels, config.partition, dataset.groups)
    clients = local_clients(config)
    needed = _needed_examples(split, clients)
    public = np.zeros(0, np.int64)
    if config.model.align_steps:
        used = np.concatenate([split.train.ravel(), split.test.ravel(), split.global_test])
        public = align.public_rows(len(dataset.labels), used, config.model.align_examples, config.seed)
        needed = np.union1d(needed, public)
    encoded = instructions.encode_instructions(
        tokenizer, [""] * len(needed), dataset.labels[needed], instructions.answers_for(dataset.label_names),
        config.model.max_length, model_config.pad_token_id, question=instructions.IMAGE_QUESTION)
    # The ViT is frozen: each needed image is encoded once, here, not in every step.
    encoded["image_tokens"] = vlm.image_tokens(vision_config, jax.tree.map(jnp.asarray, vision_params),
                                               dataset.images[needed], image_size=config.model.image_size,
                                               grid=config.model.image_grid)
    prefix = encoded["image_tokens"].shape[1]
    if prefix + config.model.max_length > model_config.max_position_embeddings:
        raise ValueError(f"{prefix} image tokens plus model.max_length={config.model.max_length} exceed the "
                         f"decoder's context of {model_config.max_position_embeddings}")
    train, test, global_test = _client_examples(encoded, dataset.labels, needed, split, clients)

    model = vlm.VisionLanguageModel(model_config, lora_scale=adapter_config.scale,
                                    dtype=_DTYPES[config.model.dtype])
    key_projector, key_adapter = jax.random.split(jax.random.key(config.seed))
    params = {"decoder": jax.tree.map(jnp.asarray, decoder_params),
              "projector": vlm.init_projector(key_projector, vision_config.hidden_size, model_config.hidden_size)}
    answer_positions = encoded["targets"].shape[1]

    def logits_fn(full_params, lora_params, batch, dropout_key):
        return model.apply({"params": full_params, "lora": lora_params}, batch["image_tokens"],
                           batch["input_ids"], batch["attention_mask"], last=answer_positions)

    preparation = {}
    if config.model.align_steps:
        rows = np.searchsorted(needed, public)
        params["projector"], preparation["projector_alignment"] = align.align_projector(
            logits_fn, params, {name: value[rows] for name, value in encoded.items()},
            steps=config.model.align_steps, batch_size=config.model.align_batch_size,
            learning_rate=config.model.align_learning_rate, key=jax.random.fold_in(key_projector, 1),
            progress=progress)
    base_params, client_params, roles = _client_parameters(params, config, method, adapter_config, key_adapter)
    if not config.model.align_steps:  # an aligned projector may stay frozen on purpose
        warn_if_projector_frozen(client_params, config.model.trainable_base)

    def embed_fn(full_params, image_tokens):
        return image_tokens[:, 0]  # the frozen ViT's CLS token: the client's data space

    return FederatedSetup(config, method, adapter_config, model, logits_fn, base_params,
                          client_params, roles, train, test, global_test,
                          config.partition.num_clients, _local_steps(config), dataset.num_classes, embed_fn,
                          clients, embed_inputs=("image_tokens",), preparation=preparation)


def warn_if_projector_frozen(client_params: dict, trainable_base: str) -> bool:
    """Warns (and returns True) when a VLM's projector is not among the client-trained
    parameters: it would stay at its random initialization."""
    if "projector" in client_params["params"]:
        return False
    logger.warning("model.trainable_base=%r does not match the projector: it stays at its random "
                   "initialization, so the decoder sees noise for the images; add 'projector/' to train it "
                   "(the vlm presets do)", trainable_base)
    return True


def warn_if_padding_wasteful(num_clients: int, padded_clients: int) -> bool:
    """Warns (and returns True) when padding the client axis to whole blocks and devices
    adds more than a quarter of empty client slots, which every round trains and evaluates."""
    if 4 * (padded_clients - num_clients) <= num_clients:
        return False
    logger.warning("%d clients run as %d client slots (the client axis is padded to a multiple of "
                   "federation.client_block and of the devices); %d empty slots cost compute and memory "
                   "every round: a client_block (and a federation.num_devices) that divides the number of "
                   "clients avoids them",
                   num_clients, padded_clients, padded_clients - num_clients)
    return True


def make_strategy(setup: FederatedSetup) -> strategies.Strategy:
    if not setup.method.shared:
        return strategies.local_only()
    if setup.method.personalized:
        from celora_jax.federated import personalized

        return personalized.celora_strategy(setup)
    return strategies.weighted_average()


def bytes_per_client(client_params: dict, roles: dict) -> int:
    """Bytes of the arrays one client uploads (and downloads) per round."""
    shared = methods.select(client_params, roles, methods.SHARED)
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(shared)))


def reporting_clients(num_clients: int, participation: float, client_dropout: float, seed: int,
                      round_index: int) -> np.ndarray:
    """Which clients report in a round: ``ceil(participation · N)`` sampled without
    replacement, then each sampled client drops out with probability ``client_dropout``.

    Depends only on (seed, round), so a resumed run samples the same clients.
    """
    rng = np.random.default_rng((seed, round_index, 0x5EED))
    sampled = np.zeros(num_clients, bool)
    # The tolerance keeps e.g. 0.3 x 10 at 3 clients despite float rounding (3.0000000000000004).
    count = max(1, math.ceil(participation * num_clients - 1e-9))
    sampled[rng.choice(num_clients, size=count, replace=False)] = True
    return sampled & (rng.random(num_clients) >= client_dropout)


def _per_client(tree, reduce_leaf) -> Array:
    """Sums ``reduce_leaf(leaf [N, ...]) -> [N]`` over the leaves of a client-stacked tree."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return None
    per_leaf = jnp.stack([reduce_leaf(leaf.reshape(leaf.shape[0], -1)).astype(jnp.float32) for leaf in leaves])
    # Summed by a matrix product, which XLA computes once: a chain of adds (or a reduce of
    # the stack, which XLA rewrites into one) is fused into every consumer of the result (a
    # client select per leaf), work quadratic in the leaves that made a 30-layer decoder's
    # FedAvg-LoRA round compile for minutes.
    return jnp.ones((len(leaves),), jnp.float32) @ per_leaf


def non_finite_updates(trained, mask) -> Array:
    """``[N]`` bool: reporting clients with a NaN/Inf anywhere in their trained parameters."""
    non_finite_count = _per_client(trained, lambda x: jnp.sum(~jnp.isfinite(x), axis=1))
    return mask & (False if non_finite_count is None else non_finite_count > 0)


def rejected_updates(sent_before, uploads, non_finite, mask, outlier_factor: float) -> Array:
    """``[N]`` bool: reporting clients whose upload the server sets aside.

    A client is rejected when its trained parameters hold NaN/Inf (``non_finite``, from
    ``non_finite_updates``), or (``outlier_factor`` > 0) when the norm of its uploaded
    change exceeds ``outlier_factor`` times the median norm over the reporting clients
    with finite updates.
    """
    finite = ~non_finite
    rejected = mask & ~finite
    change = jax.tree.map(lambda new, old: new - old, uploads, sent_before)
    squared = _per_client(change, lambda x: jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0) ** 2, axis=1))
    if outlier_factor > 0 and squared is not None:
        norms = jnp.sqrt(squared)
        median = jnp.nanmedian(jnp.where(mask & finite, norms, jnp.nan))
        rejected |= mask & finite & (median > 0) & (norms > outlier_factor * median)
    return rejected


# Every client starts from the same state (a module-level name so tests can poison one client).
_stack = strategies.broadcast


def _where_clients(mask, new, old):
    def pick(n, o):
        return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)
    return jax.tree.map(pick, new, old)


def build_round_step(setup: FederatedSetup, strategy: strategies.Strategy, mesh) -> Callable:
    """The jitted round: local training of all clients, aggregation, download.

    ``round_step(base, client_state, server_state, batches, mask, sizes, key, round_index)
    -> (client_state, server_state, metrics, logs)``; clients with ``mask`` False are
    trained (static shapes) but neither counted by the server nor updated.
    """
    config = setup.config
    total_steps = config.federation.rounds * setup.local_steps
    client_update = client_lib.make_client_update(setup.logits_fn, setup.roles, config.optimizer, total_steps)
    roles = setup.roles
    noise_multiplier = dp_lib.resolve_noise_multiplier(config.dp, config.federation.rounds)
    privatize = jax.vmap(dp_lib.privatize_update, in_axes=(0, None, None, 0))
    train_clients = blocks.blocked_vmap(client_update, (None, 0, 0, 0, None),
                                        sharding.client_block_size(config.federation.client_block, mesh))

    def round_step(base, client_state, server_state, batches, mask, sizes, key, round_index):
        keys = jax.random.split(key, mask.shape[0])
        trained, metrics = train_clients(base, client_state, batches, keys, round_index)
        sent_before = methods.select(client_state["params"], roles, methods.SHARED)
        uploads = methods.select(trained["params"], roles, methods.SHARED)
        dp_logs = {}
        if config.dp.enabled and jax.tree.leaves(uploads):
            # The client clips and noises its change before it leaves: the server sees only this.
            change = jax.tree.map(jnp.subtract, uploads, sent_before)
            noise_keys = jax.random.split(jax.random.fold_in(key, 0xD1FF), mask.shape[0])
            noised, norms = privatize(change, config.dp.clip_norm, noise_multiplier, noise_keys)
            uploads = jax.tree.map(jnp.add, sent_before, noised)
            dp_logs = {"update_norm": norms}
        learned = methods.select(trained["params"], roles, methods.SHARED, methods.PERSONAL)
        broken = non_finite_updates(learned, mask)
        accepted = mask & ~rejected_updates(sent_before, uploads, broken, mask, config.federation.outlier_factor)
        # Zero what rejected clients sent: a weight of 0 does not cancel NaN in a weighted sum.
        uploads = _where_clients(accepted, uploads, jax.tree.map(jnp.zeros_like, uploads))
        server_state, downloads, logs = strategy.aggregate(server_state, uploads, sizes, accepted)
        received = methods.combine(downloads, methods.select(trained["params"], roles,
                                                             methods.PERSONAL, methods.FROZEN))
        new_state = {"params": received, "opt_state": trained["opt_state"]}
        logs = {**logs, **dp_logs, "rejected": mask & ~accepted, "non_finite": broken}
        if ("lora" in trained["params"] and setup.method.adapter_kind == adapters_lib.TRI
                and not setup.adapter_config.core_only):
            # What each client learned that its core (the only thing shared) carries; under
            # core_only (C starts at 0) the core is the whole update by construction.
            logs["core_share"] = jnp.mean(adapters_lib.core_share(trained["params"]["lora"]), axis=-1)
        # Outliers (finite but unusually large uploads) keep their own round of training and
        # only miss the mixture: under strong label skew the clients still learning are the
        # "outliers" of clients that have converged, and rolling them back would freeze them.
        # Absent clients and clients with NaN/Inf keep the state they had before the round.
        own_round = _where_clients(mask & ~broken, trained, client_state)
        return _where_clients(accepted, new_state, own_round), server_state, metrics, logs

    clients, replicated = sharding.clients_sharding(mesh), sharding.replicated(mesh)
    batch = sharding.batch_sharding(mesh)
    return jax.jit(
        round_step,
        in_shardings=(replicated, clients, replicated, batch, clients, clients, replicated, replicated),
        out_shardings=(clients, replicated, clients, replicated),
        donate_argnums=(1,))


def build_evaluate(setup: FederatedSetup, mesh) -> tuple[Callable, Callable]:
    """Jitted evaluation on each client's own test split and on the common test set."""
    evaluate = client_lib.make_evaluate(setup.logits_fn, setup.config.federation.eval_batch_size)
    block = sharding.client_block_size(setup.config.federation.client_block, mesh)
    clients, replicated = sharding.clients_sharding(mesh), sharding.replicated(mesh)
    own = jax.jit(blocks.blocked_vmap(evaluate, (None, 0, 0), block),
                  in_shardings=(replicated, clients, clients), out_shardings=clients)
    common = jax.jit(blocks.blocked_vmap(evaluate, (None, 0, None), block),
                     in_shardings=(replicated, clients, replicated), out_shardings=clients)
    return own, common


@dataclasses.dataclass
class RunResult:
    history: list[dict]
    summary: dict
    client_params: Any = None


def _mean_over(values, mask: np.ndarray) -> float:
    values = np.asarray(values)
    return float(values[mask].mean()) if mask.any() else float("nan")


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float, str)) and not k.startswith("_")}


def iterate_rounds(setup: FederatedSetup, checkpoint_dir: str | pathlib.Path | None = None,
                   resume: bool = False) -> Iterator[dict]:
    """Runs the federated rounds, yielding one record per round.

    With ``checkpoint_dir`` the state is saved every ``config.checkpoint.every`` rounds (and
    after the last); with ``resume`` the latest checkpoint there is restored first and only
    the remaining rounds run (the first yielded record tells which round that is).
    """
    config, fed = setup.config, setup.config.federation
    mesh = sharding.client_mesh(fed.num_devices, fed.data_parallel)
    n, n_pad = setup.num_clients, sharding.padded_client_count(setup.num_clients, mesh, fed.client_block)
    warn_if_padding_wasteful(n, n_pad)
    strategy = make_strategy(setup)
    round_step = build_round_step(setup, strategy, mesh)
    evaluate_own, evaluate_common = build_evaluate(setup, mesh)

    base = sharding.put_replicated(setup.base_params, mesh)
    stacked = _stack(setup.client_params, n_pad)
    state = client_lib.init_client_state(setup.client_params, setup.roles, config.optimizer)
    client_state = sharding.put_clients({"params": stacked, "opt_state": _stack(state["opt_state"], n_pad)}, mesh)
    sizes_np = np.concatenate([setup.sizes, np.zeros(n_pad - n, np.float32)])
    uploads0 = methods.select(stacked, setup.roles, methods.SHARED)
    server_state = sharding.put_replicated(strategy.init(uploads0, jnp.asarray(sizes_np)), mesh)
    test = sharding.put_clients(packing.pad_clients(setup.test, n_pad), mesh)
    global_test = sharding.put_replicated(setup.global_test, mesh)
    padded_train = packing.pad_clients(setup.train, n_pad)
    sizes = sharding.put_clients(sizes_np, mesh)
    per_client_bytes = bytes_per_client(setup.client_params, setup.roles)
    noise_multiplier = dp_lib.resolve_noise_multiplier(config.dp, fed.rounds)
    root_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    cumulative_bytes, start, saved_history = 0, 0, []

    checkpoints = None
    if checkpoint_dir is not None and (config.checkpoint.every > 0 or resume):
        checkpoints = checkpoint.manager(checkpoint_dir, config.checkpoint.keep)
    several_processes = jax.process_count() > 1

    def saved_state():
        """What a checkpoint holds: with one process the real clients on the host; with
        several the sharded arrays as they are, each process writing its own rows."""
        if several_processes:
            return client_state, server_state
        return jax.tree.map(lambda x: np.asarray(x)[:n], jax.device_get(client_state)), jax.device_get(server_state)

    if resume:
        like = lambda x, rows=None: jax.ShapeDtypeStruct((rows or x.shape[0], *x.shape[1:]), x.dtype,
                                                         sharding=None if rows else x.sharding)
        found = checkpoint.restore(checkpoints, jax.tree.map(lambda x: like(x, n), client_state),
                                   jax.tree.map(like, server_state),
                                   padded_clients_like=jax.tree.map(like, client_state) if several_processes else None)
        if found is None:
            raise checkpoint.CheckpointError(f"no checkpoint to resume from in {checkpoint_dir}")
        start, clients, server, meta = found
        if meta["clients_layout"] == "sharded":
            client_state = clients  # read back shard by shard, already in place
        else:
            client_state = sharding.put_clients(jax.tree.map(
                lambda x: np.concatenate([np.asarray(x), np.zeros((n_pad - n, *x.shape[1:]), x.dtype)]), clients),
                mesh)
        if server is not None:
            server_state = sharding.put_replicated(server, mesh)
        cumulative_bytes, saved_history = meta["bytes_cumulative"], meta["history"]

    for round_index in range(start, fed.rounds):
        started = time.perf_counter()
        batches = packing.round_batches(padded_train, setup.local_steps, fed.batch_size,
                                        config.seed, round_index)
        batches = sharding.put_clients(batches, mesh, sharding.batch_sharding(mesh))
        mask_np = np.zeros(n_pad, bool)
        mask_np[:n] = reporting_clients(n, fed.participation, fed.client_dropout, config.seed, round_index)
        mask = sharding.put_clients(mask_np, mesh)
        client_state, server_state, metrics, logs = round_step(
            base, client_state, server_state, batches, mask, sizes,
            jax.random.fold_in(root_key, round_index), jnp.int32(round_index))
        metrics, logs = sharding.to_host((metrics, logs))
        participants = int(mask_np[:n].sum())
        round_bytes = 2 * per_client_bytes * participants
        cumulative_bytes += round_bytes
        record = {
            "round": round_index + 1,
            "method": setup.method.name,
            # Absent clients are computed too (static shapes) but their round does not count.
            "train_loss": _mean_over(metrics["train_loss"], mask_np),
            "train_accuracy": _mean_over(metrics["train_accuracy"], mask_np),
            "participants": participants,
            "reporting_clients": [int(i) for i in np.flatnonzero(mask_np[:n])],
            "bytes_up_per_client": per_client_bytes,
            "bytes_down_per_client": per_client_bytes,
            "bytes_round": round_bytes,
            "bytes_cumulative": cumulative_bytes,
        }
        last = round_index + 1 == fed.rounds
        if last or (round_index + 1) % fed.eval_every == 0:
            scores = sharding.to_host(evaluate_own(base, client_state["params"], test))
            accuracy = scores["correct"][:n] / np.maximum(scores["count"][:n], 1)
            record.update(test_accuracy_mean=float(accuracy.mean()), test_accuracy_std=float(accuracy.std()),
                          test_loss=float((scores["loss"][:n] / np.maximum(scores["count"][:n], 1)).mean()),
                          client_test_accuracy=[float(a) for a in accuracy])
        if last and len(setup.global_test["labels"]):
            scores = sharding.to_host(evaluate_common(base, client_state["params"], global_test))
            accuracy = scores["correct"][:n] / np.maximum(scores["count"][:n], 1)
            record.update(global_test_accuracy_mean=float(accuracy.mean()),
                          global_test_accuracy_std=float(accuracy.std()))
        for name, value in logs.items():
            value = np.asarray(value)
            record[name] = value[:n, :n].tolist() if value.ndim == 2 else value[:n].tolist()
        if config.dp.enabled:
            record.update(_dp_record(config, noise_multiplier, round_index + 1,
                                     record.get("update_norm"), mask_np[:n]))
        if "core_share" in record:
            record["core_share_mean"] = _mean_over(record["core_share"], mask_np[:n])
        rejected = [i for i, flag in enumerate(record.pop("rejected")) if flag]
        non_finite = [i for i, flag in enumerate(record.pop("non_finite")) if flag]
        outliers = [i for i in rejected if i not in non_finite]
        record["rejected_clients"], record["non_finite_clients"] = rejected, non_finite
        if non_finite:
            logger.warning("round %d: clients %s produced NaN/Inf; their round was discarded and they "
                           "were left out of aggregation", round_index + 1, non_finite)
        if outliers:
            logger.warning("round %d: clients %s sent updates over %g times the median norm; they keep "
                           "their own training but were left out of aggregation", round_index + 1,
                           outliers, fed.outlier_factor)
        record["seconds"] = time.perf_counter() - started
        saved_history.append(_scalars(record))
        every = config.checkpoint.every
        if checkpoints is not None and every > 0 and (last or (round_index + 1) % every == 0):
            checkpoint.save(checkpoints, round_index + 1, *saved_state(),
                            {"round": round_index + 1, "bytes_cumulative": cumulative_bytes,
                             "history": saved_history}, num_clients=n)
        record["_client_params"] = client_state["params"]
        yield record


def _dp_record(config: RunConfig, noise_multiplier: float, rounds_done: int, update_norms,
               reporting: np.ndarray) -> dict:
    """Privacy spent so far (every client counted in every round, so an upper bound) and,
    over the reporting clients, how often the clip bound was hit."""
    dp = config.dp
    record = {"dp_epsilon": dp_lib.epsilon(noise_multiplier, rounds_done, dp.delta, dp.accountant),
              "dp_delta": dp.delta, "dp_noise_multiplier": noise_multiplier}
    norms = np.asarray(update_norms if update_norms is not None else [], np.float64)
    if len(norms) and reporting.any():
        record.update(dp_clipped_fraction=float((norms[reporting] > dp.clip_norm).mean()),
                      dp_update_norm_median=float(np.median(norms[reporting])))
    return record


def summarize(history: list[dict], setup: FederatedSetup) -> dict:
    final = history[-1]
    summary = {
        "method": setup.method.name,
        "description": setup.method.description,
        "rounds": len(history),
        "num_clients": setup.num_clients,
        "test_accuracy_mean": final.get("test_accuracy_mean"),
        "test_accuracy_std": final.get("test_accuracy_std"),
        "global_test_accuracy_mean": final.get("global_test_accuracy_mean"),
        "global_test_accuracy_std": final.get("global_test_accuracy_std"),
        "mb_per_round": final["bytes_round"] / 1e6,
        "mb_up_per_client_round": final["bytes_up_per_client"] / 1e6,
        "mb_total": final["bytes_cumulative"] / 1e6,
        "seconds": float(sum(r["seconds"] for r in history)),
        "processes": jax.process_count(),
        "devices": setup.config.federation.num_devices or jax.device_count(),
        "data_parallel": setup.config.federation.data_parallel,
        # The clients whose data this process loaded (process 0's share with several).
        "local_clients": list(setup.local_range),
    }
    if "core_share_mean" in final:
        summary["core_share_mean"] = final["core_share_mean"]
    summary.update(setup.preparation)
    if "dp_epsilon" in final:
        summary.update({k: final[k] for k in ("dp_epsilon", "dp_delta", "dp_noise_multiplier")},
                       dp_clip_norm=setup.config.dp.clip_norm)
    return summary


def shared_checkpoint_path(directory: str, name: str, method: str) -> str:
    """Where a run's checkpoints go under ``checkpoint.directory`` (local or ``gs://``)."""
    return f"{directory.rstrip('/')}/{name}/{method}"


def checkpoint_directory(config: RunConfig, output_dir: str | pathlib.Path | None) -> str | pathlib.Path | None:
    """``checkpoint.directory/<name>/<method>`` if set, else ``<output_dir>/checkpoints``."""
    if config.checkpoint.directory:
        return shared_checkpoint_path(config.checkpoint.directory, config.name, config.federation.method)
    return None if output_dir is None else pathlib.Path(output_dir) / "checkpoints"


def run(config: RunConfig, *, progress: bool = False, output_dir: str | pathlib.Path | None = None,
        resume: bool = False) -> RunResult:
    """Prepares and runs one method.

    With ``output_dir``, writes ``config.json``, ``metrics.jsonl`` (one line per round),
    ``summary.json`` and, when ``config.checkpoint.every`` > 0, orbax checkpoints under
    ``checkpoints/``. ``resume=True`` continues from the latest checkpoint there. With
    several processes (``jax.distributed``) every process runs this and only process 0
    writes files and shows progress.
    """
    if output_dir is None and resume:
        raise ValueError("resume needs the output_dir that holds the checkpoints")
    checkpoint_dir = checkpoint_directory(config, output_dir)
    if checkpoint_dir is not None and not resume and checkpoint.has_checkpoints(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} already holds checkpoints of a run; resume it (--resume) "
                         "or choose another output directory")
    if jax.process_index() != 0:
        output_dir, progress = None, False  # every process saves checkpoints, process 0 the rest
    setup = prepare(config, progress=progress)
    out = None
    history: list[dict] = []
    config_text = json.dumps(to_dict(config), indent=2, sort_keys=True)
    if output_dir is not None:
        out = pathlib.Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / "metrics.jsonl"
        if resume:
            if metrics_path.exists():
                history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        else:
            (out / "config.json").write_text(config_text)
            metrics_path.write_text("")
    client_params, files_updated = None, False
    rounds = iterate_rounds(setup, checkpoint_dir, resume)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, total=config.federation.rounds, desc=setup.method.name, unit="round")
    for record in rounds:
        client_params = record.pop("_client_params")
        if resume and out is not None and not files_updated:
            # The checkpoint restored fine: only now touch the files of the interrupted run.
            # Rounds after the checkpoint were lost with it, so their lines go.
            files_updated = True
            history = [r for r in history if r["round"] < record["round"]]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
            (out / "config.json").write_text(config_text)
        history.append(record)
        if progress:
            rounds.set_postfix(loss=f"{record['train_loss']:.3f}",
                               acc=f"{record.get('test_accuracy_mean', float('nan')):.3f}",
                               MB=f"{record['bytes_cumulative'] / 1e6:.2f}")
        if out is not None:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
    if not history:
        raise ValueError("the run produced no rounds")
    summary = summarize(history, setup)
    if client_params is not None:
        client_params = jax.tree.map(lambda x: x[: setup.num_clients], client_params)  # drop mesh padding
    if config.export_peft and client_params is not None:
        host_params = sharding.to_host(client_params)  # a collective: every process takes part
        if out is not None:
            _export_clients(setup, host_params, out / "adapters")
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(history, summary, client_params)


def _export_clients(setup: FederatedSetup, client_params, directory: pathlib.Path) -> None:
    """One PEFT LoRA folder per client: ``directory/client_0000`` ..."""
    from celora_jax.export import export_peft

    adapter = setup.adapter_config
    if setup.config.model.architecture == "encoder":
        base_model = str(setup.config.model.path or loading.default_model_dir())
    else:
        from celora_jax.models import decoder_loading

        base_model = str(setup.config.model.path or decoder_loading.default_gguf_path())
    lora = jax.device_get(client_params["lora"])
    for client in range(setup.num_clients):
        export_peft(jax.tree.map(lambda x: x[client], lora), directory / f"client_{client:04d}",
                    rank=adapter.rank, alpha=adapter.scale * adapter.rank, base_model=base_model)
