"""Tasks by ``model.architecture``: each loads its model and data and returns a ``Task``.

  encoder  BERT-family sequence classification on labelled texts (MiniLM by default)
  decoder  Llama-family instruction tuning on chats built from labelled texts (SmolLM2)
  vlm      LLaVA-style visual question answering (DINOv2 ViT + projector + SmolLM2)
  vit      image classification: a ViT (DINOv2 ViT-S/14) with a linear head on its CLS token
"""

from __future__ import annotations

import types

from celora_jax.federated.config import RunConfig
from celora_jax.federated.tasks import decoder, encoder, vision, vlm
from celora_jax.federated.tasks.base import Task
from celora_jax.lora import adapters as adapters_lib

TASKS = types.MappingProxyType({"encoder": encoder.prepare, "decoder": decoder.prepare, "vlm": vlm.prepare,
                                 "vit": vision.prepare})


def prepare_task(config: RunConfig, adapter_config: adapters_lib.AdapterConfig, *, progress: bool = False) -> Task:
    """The task of ``config.model.architecture`` (``progress``: bars for long preparation)."""
    return TASKS[config.model.architecture](config, adapter_config, progress=progress)


__all__ = ["TASKS", "Task", "prepare_task"]
