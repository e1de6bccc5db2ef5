"""Image classification with a ViT (the shipped DINOv2 ViT-S/14 by default) and a linear head
on its CLS token, tri-LoRA in every block, on Fashion-MNIST or any MNIST-style IDX data.

Images stay uint8 at their stored size in the client arrays; resizing and normalization run
inside the step. Under ``partition.scheme="clustered_rotations"`` each client's images are
turned by its cluster's quarter turns once, here, so the cluster is a domain of its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from celora_jax.data import images as images_lib
from celora_jax.data.errors import DataError
from celora_jax.federated.config import RunConfig
from celora_jax.federated.tasks import base
from celora_jax.lora import adapters as adapters_lib
from celora_jax.models import vision_loading, vit


def base_model_path(config: RunConfig) -> str:
    return str(config.model.vision_path or vision_loading.default_onnx_path())


def init_classifier_params(key: jax.Array, vision_config: vit.VisionConfig, backbone: dict,
                           num_classes: int) -> dict:
    """The loaded trunk under ``backbone`` plus a fresh head on its CLS token (Flax Dense's
    own initialization: LeCun-normal kernel, zero bias)."""
    kernel = jax.nn.initializers.lecun_normal()(key, (vision_config.hidden_size, num_classes), jnp.float32)
    return {"backbone": jax.tree.map(jnp.asarray, backbone),
            "classifier": {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}}


def prepare(config: RunConfig, adapter_config: adapters_lib.AdapterConfig, *, progress: bool = False) -> base.Task:
    """Loads the ViT and the images, partitions clients and builds the classifier."""
    options = base.block_options(config)
    dataset = images_lib.load_fashion_mnist(config.data.path)
    height, width = dataset.images.shape[1:3]
    if config.partition.scheme == "clustered_rotations" and height != width:
        raise DataError(f"partition.scheme='clustered_rotations' turns images by quarter turns, which needs "
                        f"square images; {config.data.path or 'the data'} holds {height}x{width} images")
    split = base.split_clients(dataset, config)
    vision_config, vision_params = vision_loading.load_vision(config.model.vision_path)
    vision_config = dataclasses.replace(vision_config, **options)
    size = config.model.image_size
    if size % vision_config.patch_size:
        raise vit.ImageInputError(f"model.image_size={size} is not a multiple of the ViT's patch size "
                                  f"{vision_config.patch_size}")
    clients = base.process_clients(config)
    needed = base.needed_examples(split, clients)
    train, validation, test, global_test = base.client_examples(
        {"images": dataset.images[needed]}, dataset.labels, needed, split, clients,
        config.partition.pooled_training, config.partition.validation_examples)

    scan = config.model.scan_layers
    model = vit.ImageClassifier(vision_config, dataset.num_classes, size, lora_scale=adapter_config.scale,
                                scan_layers=scan)
    key_head, key_adapter = jax.random.split(jax.random.key(config.seed))
    params = init_classifier_params(key_head, vision_config,
                                    adapters_lib.stack_layers(vision_params) if scan else vision_params,
                                    dataset.num_classes)
    base_params, client_params = base.client_parameters(params, config, adapter_config, key_adapter)

    def logits_fn(full_params, lora_params, batch, dropout_key):
        return model.apply({"params": full_params, "lora": lora_params}, batch["images"])

    trunk = vit.VisionTransformer(vision_config, scan_layers=scan)

    def embed_fn(full_params, images):
        pixels = vit.prepare_pixels(images, vision_config, size)
        return trunk.apply({"params": full_params["backbone"]}, pixels)[:, 0].astype(jnp.float32)

    return base.Task(logits_fn, embed_fn, ("images",), base_params, client_params, adapter_config,
                     train, test, global_test, dataset.num_classes, clients, base_model_path(config),
                     clusters=split.clusters, validation=validation)
