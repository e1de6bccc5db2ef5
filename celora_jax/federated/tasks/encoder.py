"""Sequence classification with a BERT-family encoder (MiniLM by default) on labelled texts."""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp

from celora_jax.data.text import load_text_dataset
from celora_jax.federated.config import RunConfig
from celora_jax.federated.tasks import base
from celora_jax.lora import adapters as adapters_lib
from celora_jax.models import loading
from celora_jax.models.bert import BertModel, pool

logger = logging.getLogger(__name__)


def check_max_length(max_length: int, model_config, model_dir) -> None:
    """``model.max_length`` fits the encoder's position table (RoBERTa-style models number
    real tokens from pad_token_id + 1, so they hold that many fewer)."""
    offset = model_config.pad_token_id + 1 if model_config.roberta_positions else 0
    positions = model_config.max_position_embeddings - offset
    if max_length > positions:
        raise loading.ModelLoadError(f"model.max_length={max_length} exceeds the {positions} positions of the "
                                     f"encoder in {model_dir}")


def prepare(config: RunConfig, adapter_config: adapters_lib.AdapterConfig, *, progress: bool = False) -> base.Task:
    """Loads the encoder and the texts, partitions and tokenizes this process's clients."""
    options = base.block_options(config)  # before anything loads: a cuDNN run off a GPU stops here
    model_dir = loading.default_model_dir() if config.model.path is None else pathlib.Path(config.model.path)
    model_config = loading.read_encoder_config(model_dir)  # fails early on a bad directory
    check_max_length(config.model.max_length, model_config, model_dir)
    if options["attention"] != "einsum" and model_config.attention_dropout and config.optimizer.dropout:
        logger.info("model.attention=%r: the fused attention applies no dropout to attention probabilities "
                    "(the encoder's config asks for %g); hidden-state dropout is unchanged",
                    options["attention"], model_config.attention_dropout)

    dataset = load_text_dataset(config.data)
    split = base.split_clients(dataset, config)
    tokenizer = loading.load_tokenizer(model_dir)
    clients = base.process_clients(config)
    needed = base.needed_examples(split, clients)
    encoded = loading.encode_texts(tokenizer, [dataset.texts[i] for i in needed],
                                   config.model.max_length, model_config.pad_token_id)
    largest_id = int(encoded["input_ids"].max())
    if largest_id >= model_config.vocab_size:
        raise loading.ModelLoadError(
            f"the tokenizer of {model_dir} produced token id {largest_id} but the model's vocabulary "
            f"has {model_config.vocab_size} entries: tokenizer and model do not match")
    train, validation, test, global_test = base.client_examples(
        encoded, dataset.labels, needed, split, clients, config.partition.pooled_training,
        config.partition.validation_examples)

    key_model, key_adapter = jax.random.split(jax.random.key(config.seed))
    model, params = loading.load_classifier(
        model_dir, key_model, num_labels=dataset.num_classes, pooling=config.model.pooling,
        lora_scale=adapter_config.scale, dtype=base.compute_dtype(config), scan_layers=config.model.scan_layers,
        **options)
    base_params, client_params = base.client_parameters(params, config, adapter_config, key_adapter)

    def logits_fn(full_params, lora_params, batch, dropout_key):
        variables = {"params": full_params, "lora": lora_params}
        if dropout_key is None:
            return model.apply(variables, batch["input_ids"], batch["attention_mask"])
        return model.apply(variables, batch["input_ids"], batch["attention_mask"],
                           deterministic=False, rngs={"dropout": dropout_key})

    trunk = BertModel(model.config, dtype=model.dtype, scan_layers=model.scan_layers)
    summary = "first" if model.pooling != "mean" else "mean"

    def embed_fn(full_params, input_ids, attention_mask):
        hidden = trunk.apply({"params": full_params["backbone"]}, input_ids, attention_mask)
        return pool(hidden, attention_mask, summary).astype(jnp.float32)

    return base.Task(logits_fn, embed_fn, ("input_ids", "attention_mask"), base_params, client_params,
                     adapter_config, train, test, global_test, dataset.num_classes, clients, str(model_dir),
                     clusters=split.clusters, validation=validation)
