"""A LLaVA-style vision-language model: frozen ViT -> trainable projector -> Llama decoder.

The image encoder (:class:`celora_jax.models.vit.VisionTransformer`, DINOv2 ViT-S/14 by
default) is frozen, so its output is computed once per image (:func:`image_tokens`): the CLS
token plus the patch grid average-pooled to ``grid x grid`` tokens. During training only the
projector (a two-layer GELU MLP into the decoder's width) and the decoder's adapters (and
RMSNorm scales, if configured) learn. The projected image tokens go before the chat's token
embeddings as a prefix (:class:`celora_jax.models.llama.LlamaForCausalLM`'s ``prefix``)::

    logits = model.apply({"params": params, "lora": adapters}, image_tokens, input_ids, mask, last=K)

Parameters: ``{"projector": {"fc1", "fc2"}, "decoder": <LlamaForCausalLM params>}``; the
decoder's adapter target regex (``layers/(layer_\\d+|stacked)/...``) matches inside ``decoder``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.models import vit
from celora_jax.models.llama import DecoderConfig, LlamaForCausalLM

Array = jax.Array


class Projector(nn.Module):
    """Image features ``[..., d_vision]`` to decoder embeddings ``[..., d]`` (LLaVA-1.5's MLP)."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Dense(self.features, name="fc1", kernel_init=nn.initializers.normal(0.02))(x.astype(jnp.float32))
        return nn.Dense(self.features, name="fc2", kernel_init=nn.initializers.normal(0.02))(
            jax.nn.gelu(x, approximate=False))


class VisionLanguageModel(nn.Module):
    """``(image_tokens [B, P, d_vision], input_ids [B, T], attention_mask [B, T], last)`` to
    next-token logits ``[B, P + T, vocab]`` (``[B, last, vocab]`` with ``last``)."""

    config: DecoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, image_tokens: Array, input_ids: Array, attention_mask: Array | None = None,
                 last: int | None = None) -> Array:
        prefix = Projector(self.config.hidden_size, name="projector")(image_tokens)
        logits, _ = LlamaForCausalLM(self.config, self.lora_scale, self.dtype, self.scan_layers, name="decoder")(
            input_ids, attention_mask, last=last, prefix=prefix)
        return logits


def init_projector(key: Array, vision_width: int, hidden_size: int) -> dict:
    """Fresh projector parameters (the LLaVA projector is trained from scratch here)."""
    return Projector(hidden_size).init(key, jnp.zeros((1, vision_width)))["params"]


def image_tokens(vision_config: vit.VisionConfig, vision_params: dict, images: np.ndarray, *,
                 image_size: int, grid: int, batch_size: int = 64) -> np.ndarray:
    """Frozen ViT features of ``images`` ``[n, H, W(, C)]`` (uint8): CLS plus the patch
    tokens average-pooled to ``grid x grid``, ``[n, 1 + grid², d_vision]`` float32.

    Images are resized (bilinear) to ``image_size`` square first; ``image_size`` must be a
    multiple of the patch size and give a patch grid divisible by ``grid``.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise vit.ImageInputError(f"images must be [n, height, width(, channels)], got shape {images.shape}")
    patches = image_size // vision_config.patch_size
    if image_size % vision_config.patch_size or patches % grid:
        raise vit.ImageInputError(
            f"image_size {image_size} must be a multiple of the patch size {vision_config.patch_size} whose "
            f"patch grid ({patches}) is divisible by the pooled grid {grid}")
    model = vit.VisionTransformer(vision_config)

    @jax.jit
    def encode(params, chunk):
        pixels = vit.normalize_images(chunk, vision_config)
        pixels = jax.image.resize(pixels, (pixels.shape[0], image_size, image_size, pixels.shape[-1]), "bilinear")
        tokens = model.apply({"params": params}, pixels)
        cls, grid_tokens = tokens[:, :1], tokens[:, 1:].reshape(-1, grid, patches // grid, grid,
                                                                patches // grid, tokens.shape[-1])
        return jnp.concatenate([cls, grid_tokens.mean(axis=(2, 4)).reshape(-1, grid * grid, tokens.shape[-1])], 1)

    n = images.shape[0]
    padded = max(-(-n // batch_size), 1) * batch_size
    images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), images.dtype)])
    out = [np.asarray(encode(vision_params, images[i:i + batch_size])) for i in range(0, padded, batch_size)]
    return np.concatenate(out)[:n].astype(np.float32)
