"""Visual question answering with a LLaVA-style model: a frozen ViT, a trained projector and
the decoder answer "What item of clothing is this?" about each image, in words."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.data import images as images_lib, instructions
from celora_jax.federated import align
from celora_jax.federated.config import RunConfig
from celora_jax.federated.tasks import base, decoder
from celora_jax.lora import adapters as adapters_lib
from celora_jax.models import vision_loading, vlm

logger = logging.getLogger(__name__)


def prepare(config: RunConfig, adapter_config: adapters_lib.AdapterConfig, *, progress: bool = False) -> base.Task:
    """Loads ViT, projector and decoder and the images; encodes every needed image once and
    (with ``model.align_steps``) pre-aligns the projector on public images."""
    adapter_config, model_config, decoder_params, tokenizer = decoder.load_decoder(config, adapter_config)
    vision_config, vision_params = vision_loading.load_vision(config.model.vision_path)

    dataset = images_lib.load_fashion_mnist(config.data.path)
    split = base.split_clients(dataset, config)
    clients = base.process_clients(config)
    needed = base.needed_examples(split, clients)
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
    train, validation, test, global_test = base.client_examples(
        encoded, dataset.labels, needed, split, clients, config.partition.pooled_training,
        config.partition.validation_examples)

    model = vlm.VisionLanguageModel(model_config, lora_scale=adapter_config.scale,
                                    dtype=base.compute_dtype(config), scan_layers=config.model.scan_layers)
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
    base_params, client_params = base.client_parameters(params, config, adapter_config, key_adapter)
    if not config.model.align_steps:  # an aligned projector may stay frozen on purpose
        warn_if_projector_frozen(client_params, config.model.trainable_base)

    def embed_fn(full_params, image_tokens):
        return image_tokens[:, 0]  # the frozen ViT's CLS token: the client's data space

    return base.Task(logits_fn, embed_fn, ("image_tokens",), base_params, client_params, adapter_config,
                     train, test, global_test, dataset.num_classes, clients, decoder.base_model_path(config),
                     clusters=split.clusters, validation=validation, preparation=preparation)


def warn_if_projector_frozen(client_params: dict, trainable_base: str) -> bool:
    """Warns (and returns True) when a VLM's projector is not among the client-trained
    parameters: it would stay at its random initialization."""
    if "projector" in client_params["params"]:
        return False
    logger.warning("model.trainable_base=%r does not match the projector: it stays at its random "
                   "initialization, so the decoder sees noise for the images; add 'projector/' to train it "
                   "(the vlm presets do)", trainable_base)
    return True
