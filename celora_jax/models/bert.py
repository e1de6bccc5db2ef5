"""Flax BERT-family encoder (BERT, MiniLM, RoBERTa) with adapter-aware dense layers.

Parameter names mirror Hugging Face's ``BertModel`` (``encoder/layer_0/attention/self/query/
kernel``; ``encoder/stacked/...`` with a leading layer axis under ``scan_layers``) so HF
safetensors map onto them mechanically and adapter target regexes read like
the HF names. Adapters are read from the ``"lora"`` variable collection, whose structure
mirrors the module tree (see ``celora_jax.lora.adapters``); without it the model is the plain
pre-trained encoder::

    logits = model.apply({"params": params, "lora": adapters}, input_ids, attention_mask)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from celora_jax.lora.adapters import STACKED
from celora_jax.models.layers import Dense, check_attention, fused_attention, rematerialized, scan_blocks

Array = jax.Array

_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
POOLINGS = ("mean", "first", "pooler")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT-family encoder, as read from an HF ``config.json``.

    Attributes:
      vocab_size: token vocabulary size.
      hidden_size: model width.
      num_layers: number of transformer blocks.
      num_heads: attention heads per block.
      intermediate_size: width of the MLP.
      max_position_embeddings: rows of the position table.
      type_vocab_size: rows of the token-type table (1 for RoBERTa).
      layer_norm_eps: LayerNorm epsilon.
      hidden_act: MLP activation name (HF spelling).
      hidden_dropout: dropout after embeddings, attention output and MLP.
      attention_dropout: dropout on attention probabilities.
      pad_token_id: padding token id.
      model_type: HF model type; RoBERTa-like types number positions from pad_token_id + 1.
      attention: how blocks compute attention (not an HF field; like HF's
        ``attn_implementation``): "einsum" (ours, with attention dropout), "xla" or "cudnn"
        (``jax.nn.dot_product_attention``; no dropout on the attention probabilities).
      remat: recompute each block's activations in the backward pass instead of keeping them.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    model_type: str = "bert"
    attention: str = "einsum"
    remat: bool = False

    def __post_init__(self):
        check_attention(self.attention)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; "
                             f"supported: {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "EncoderConfig":
        """Builds the config from the fields of an HF BERT/RoBERTa ``config.json``."""
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            model_type=hf.get("model_type", "bert"),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def roberta_positions(self) -> bool:
        return self.model_type in _ROBERTA_LIKE


def _layer_norm(config: EncoderConfig, name: str) -> nn.LayerNorm:
    # Statistics in float32 whatever the compute dtype; it matters for bf16 runs.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, name=name)


class Embeddings(nn.Module):
    config: EncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, deterministic, inputs_embeds=None):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        if cfg.roberta_positions:
            # RoBERTa numbers real tokens from pad_token_id + 1 and gives padding pad_token_id.
            position_ids = jnp.cumsum(attention_mask, axis=-1) * attention_mask + cfg.pad_token_id
        else:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")
        # inputs_embeds replaces the token lookup (gradient-inversion attacks optimize it).
        x = ((words(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.float32))
             + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                        name="position_embeddings")(position_ids)
             + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                        name="token_type_embeddings")(token_type_ids))
        x = _layer_norm(cfg, "LayerNorm")(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        return x.astype(self.dtype)


class SelfAttention(nn.Module):
    config: EncoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, deterministic):
        cfg = self.config
        dense = lambda name: Dense(cfg.hidden_size, self.lora_scale, self.dtype, name=name)
        heads = lambda t: t.reshape(*t.shape[:-1], cfg.num_heads, cfg.head_dim)
        query, key, value = (heads(dense(n)(x)) for n in ("query", "key", "value"))
        if cfg.attention != "einsum":
            context = fused_attention(query, key, value, attention_mask[:, None, None, :] > 0, cfg.attention)
            return context.reshape(*context.shape[:-2], cfg.hidden_size)
        scores = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(cfg.head_dim).astype(self.dtype)
        # Mask in float32 so that the large negative value cannot overflow in half precision.
        scores = scores.astype(jnp.float32)
        scores = jnp.where(attention_mask[..., None, None, :] > 0, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
        context = jnp.einsum("...hqk,...khd->...qhd", probs, value)
        return context.reshape(*context.shape[:-2], cfg.hidden_size)


class ResidualOutput(nn.Module):
    """HF's ``*Output`` block: dense, dropout, residual add, LayerNorm."""

    config: EncoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic):
        cfg = self.config
        x = Dense(cfg.hidden_size, self.lora_scale, self.dtype, name="dense")(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        return _layer_norm(cfg, "LayerNorm")(x + residual).astype(self.dtype)


class Attention(nn.Module):
    config: EncoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, deterministic):
        args = (self.config, self.lora_scale, self.dtype)
        context = SelfAttention(*args, name="self")(x, attention_mask, deterministic)
        return ResidualOutput(*args, name="output")(context, x, deterministic)


class Intermediate(nn.Module):
    config: EncoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = Dense(cfg.intermediate_size, self.lora_scale, self.dtype, name="dense")(x)
        return _ACTIVATIONS[cfg.hidden_act](x)


class Layer(nn.Module):
    """One block; under ``nn.scan`` (``scanned``) it returns ``(x, None)`` as scan needs."""

    config: EncoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32
    scanned: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic):
        args = (self.config, self.lora_scale, self.dtype)
        x = Attention(*args, name="attention")(x, attention_mask, deterministic)
        hidden = Intermediate(*args, name="intermediate")(x)
        x = ResidualOutput(*args, name="output")(hidden, x, deterministic)
        return (x, None) if self.scanned else x


class Encoder(nn.Module):
    """The blocks ``layer_0 … layer_{L-1}``, or with ``scan_layers`` one block under
    ``nn.scan`` whose parameters and adapters (module ``stacked``) carry a leading layer
    axis: the program then holds one block however deep the model, so compile time no
    longer grows with depth."""

    config: EncoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic):
        if self.scan_layers:
            # static_argnums: deterministic (self is 0) is a Python bool, not an array.
            layer = rematerialized(Layer, self.config.remat, static_argnums=(3,), scanned=True)
            blocks = scan_blocks(layer, self.config.num_layers, (nn.broadcast, nn.broadcast))
            x, _ = blocks(self.config, self.lora_scale, self.dtype, scanned=True, name=STACKED)(
                x, attention_mask, deterministic)
            return x
        layer = rematerialized(Layer, self.config.remat, static_argnums=(3,))
        for index in range(self.config.num_layers):
            x = layer(self.config, self.lora_scale, self.dtype, name=f"layer_{index}")(
                x, attention_mask, deterministic)
        return x


class BertModel(nn.Module):
    """The encoder trunk; returns the last hidden states ``[batch, seq, hidden]``."""

    config: EncoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True,
                 inputs_embeds=None):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(self.config, self.dtype, name="embeddings")(
            input_ids, attention_mask, token_type_ids, deterministic, inputs_embeds)
        return Encoder(self.config, self.lora_scale, self.dtype, self.scan_layers, name="encoder")(
            x, attention_mask, deterministic)


def pool(hidden: Array, attention_mask: Array, pooling: str) -> Array:
    """Sequence summary ``[batch, hidden]``: mask-aware mean or the first token."""
    if pooling == "mean":
        weights = attention_mask.astype(hidden.dtype)[..., None]
        return (hidden * weights).sum(-2) / jnp.maximum(weights.sum(-2), 1)
    if pooling in ("first", "pooler"):
        return hidden[..., 0, :]
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


class Pooler(nn.Module):
    """HF's BERT pooler: tanh(dense(first token))."""

    features: int

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.features, name="dense")(x))


class SequenceClassifier(nn.Module):
    """Encoder + pooling + linear head.

    Attributes:
      config: encoder architecture.
      num_labels: number of classes.
      pooling: "mean" (sentence-transformers style), "first" (first token's hidden
        state) or "pooler" (first token through HF's tanh pooler, BERT's classifier).
      lora_scale: s = alpha / r applied to every adapter found in the "lora" collection.
      dtype: compute dtype (parameters stay float32).
      scan_layers: run the blocks under ``nn.scan`` (parameters under
        ``backbone/encoder/stacked`` with a leading layer axis; see ``Encoder``).
    """

    config: EncoderConfig
    num_labels: int = 2
    pooling: str = "mean"
    lora_scale: float = 1.0
    dtype: Any = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True,
                 inputs_embeds=None):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        hidden = BertModel(self.config, self.lora_scale, self.dtype, self.scan_layers, name="backbone")(
            input_ids, attention_mask, token_type_ids, deterministic, inputs_embeds)
        pooled = pool(hidden, attention_mask, self.pooling)
        if self.pooling == "pooler":
            pooled = Pooler(self.config.hidden_size, name="pooler")(pooled)
        pooled = nn.Dropout(self.config.hidden_dropout)(pooled, deterministic=deterministic)
        return nn.Dense(self.num_labels, dtype=jnp.float32, name="classifier")(pooled.astype(jnp.float32))
