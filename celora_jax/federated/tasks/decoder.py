"""A Llama-family decoder (SmolLM2 by default) on texts: instruction tuning (each labelled
text becomes a ChatML chat asking for its label; loss on the answer tokens, exact match) or,
with ``model.objective="next_token"``, language modelling on the texts themselves (loss and
top-1 accuracy over every next token)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from celora_jax.data import instructions, language
from celora_jax.data.text import load_text_dataset
from celora_jax.federated.config import RunConfig
from celora_jax.federated.tasks import base
from celora_jax.lora import adapters as adapters_lib
from celora_jax.models import decoder_loading, llama, loading


def load_decoder(config: RunConfig, adapter_config: adapters_lib.AdapterConfig):
    """(adapter config with the decoder's default targets, decoder config, params (stacked
    with ``model.scan_layers``), tokenizer)."""
    options = base.block_options(config)  # before anything loads: a cuDNN run off a GPU stops here
    if adapter_config.target == adapters_lib.DEFAULT_TARGET:
        adapter_config = dataclasses.replace(adapter_config, target=llama.DECODER_TARGET)
    model_config, params, tokenizer = decoder_loading.load_decoder(config.model.path)
    model_config = dataclasses.replace(model_config, **options)
    if config.model.max_length > model_config.max_position_embeddings:
        raise loading.ModelLoadError(f"model.max_length={config.model.max_length} exceeds the decoder's context of "
                                     f"{model_config.max_position_embeddings} tokens")
    if tokenizer is None:
        raise loading.ModelLoadError(f"{config.model.path} has no tokenizer.json; the decoder needs one")
    if config.model.scan_layers:  # the blocks run under nn.scan: their weights load stacked
        params = adapters_lib.stack_layers(params)
    return adapter_config, model_config, params, tokenizer


def base_model_path(config: RunConfig) -> str:
    return str(config.model.path or decoder_loading.default_gguf_path())


def prepare(config: RunConfig, adapter_config: adapters_lib.AdapterConfig, *, progress: bool = False) -> base.Task:
    """Loads the decoder and the texts, partitions clients and encodes their chats."""
    adapter_config, model_config, params, tokenizer = load_decoder(config, adapter_config)

    dataset = load_text_dataset(config.data)
    split = base.split_clients(dataset, config)
    clients = base.process_clients(config)
    needed = base.needed_examples(split, clients)
    texts = [dataset.texts[i] for i in needed]
    if config.model.objective == "next_token":
        encoded = language.encode_next_token(tokenizer, texts, config.model.max_length, model_config.pad_token_id,
                                             language.start_token_id(tokenizer, model_config.bos_token_id))
    else:
        encoded = instructions.encode_instructions(
            tokenizer, texts, dataset.labels[needed], instructions.answers_for(dataset.label_names),
            config.model.max_length, model_config.pad_token_id)
    train, validation, test, global_test = base.client_examples(
        encoded, dataset.labels, needed, split, clients, config.partition.pooled_training,
        config.partition.validation_examples)

    model = llama.LlamaForCausalLM(model_config, lora_scale=adapter_config.scale, dtype=base.compute_dtype(config),
                                   scan_layers=config.model.scan_layers)
    params = jax.tree.map(jnp.asarray, params)
    key_adapter = jax.random.split(jax.random.key(config.seed))[1]
    base_params, client_params = base.client_parameters(params, config, adapter_config, key_adapter)
    answer_positions = encoded["targets"].shape[1]  # every position for next-token prediction

    def logits_fn(full_params, lora_params, batch, dropout_key):
        logits, _ = model.apply({"params": full_params, "lora": lora_params}, batch["input_ids"],
                                batch["attention_mask"], last=answer_positions)
        return logits

    def embed_fn(full_params, input_ids, attention_mask):
        hidden, _ = model.apply({"params": full_params}, input_ids, attention_mask, return_hidden=True)
        weights = attention_mask.astype(jnp.float32)[..., None]
        return (hidden * weights).sum(-2) / jnp.maximum(weights.sum(-2), 1.0)

    return base.Task(logits_fn, embed_fn, ("input_ids", "attention_mask"), base_params, client_params,
                     adapter_config, train, test, global_test, dataset.num_classes, clients,
                     base_model_path(config), clusters=split.clusters, validation=validation)
