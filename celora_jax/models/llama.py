"""Flax Llama-family decoder (Llama 2/3 layout, SmolLM2) with adapter-aware linear layers.

RMSNorm, rotary position embeddings (HF's half-split layout), grouped-query attention,
SwiGLU MLP and optionally tied input/output embeddings. Parameter names mirror Hugging
Face's ``LlamaForCausalLM`` (``layers/layer_0/self_attn/q_proj/kernel``), so an HF
safetensors checkpoint maps onto them mechanically and adapter target regexes read like the
HF names. As in :mod:`celora_jax.models.bert`, adapters are read from the ``"lora"``
collection::

    logits, _ = model.apply({"params": params, "lora": adapters}, input_ids, attention_mask)

Decoding uses an explicit key/value cache (a pytree passed in and returned, see
:func:`init_cache`), so generation is a pure function that jits and vmaps like the rest.
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

# Every linear layer of every block (q, k, v, o, gate, up, down), the default.
DECODER_TARGET = r"layers/(layer_\d+|stacked)/(self_attn|mlp)/\w+_proj/kernel$"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a Llama-family decoder, as read from an HF ``config.json`` or GGUF.

    Attributes:
      vocab_size: token vocabulary size.
      hidden_size: model width d.
      intermediate_size: width of the SwiGLU MLP.
      num_layers: number of decoder blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention; equal to num_heads for MHA).
      head_dim: width of one head (hidden_size / num_heads unless the checkpoint says else).
      rope_theta: base of the rotary frequencies.
      rms_norm_eps: RMSNorm epsilon.
      tie_embeddings: the output projection is the transposed token embedding.
      max_position_embeddings: longest supported context (prompts beyond it are rejected).
      bos_token_id: beginning-of-sequence id.
      eos_token_id: end-of-sequence id (generation stops there).
      pad_token_id: id used for padding.
      attention: how blocks compute attention (not an HF field; like HF's
        ``attn_implementation``): "einsum" (ours), "xla" or "cudnn" (``jax.nn.dot_product_attention``).
      remat: recompute each block's activations in the backward pass instead of keeping them.
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    attention: str = "einsum"
    remat: bool = False

    def __post_init__(self):
        check_attention(self.attention)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "DecoderConfig":
        """Builds the config from an HF Llama ``config.json``.

        Raises:
          ValueError: not a Llama-layout config, or a feature we do not implement (rope
            scaling, attention/MLP biases, an activation other than SiLU).
        """
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"unsupported decoder model_type {model_type!r}; expected 'llama'")
        # transformers 5 writes {"rope_parameters": {"rope_type", "rope_theta", ...}}; older
        # configs have "rope_theta" and an optional "rope_scaling".
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {scaling!r} is not supported (plain RoPE only)")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("attention/MLP biases are not supported by this Llama implementation")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; Llama uses 'silu'")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id", 2)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad, bos = hf.get("pad_token_id"), hf.get("bos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=bos if bos is not None else 1,
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else eos,
        )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · scale, statistics in float32 (as HF's LlamaRMSNorm)."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * normed.astype(x.dtype)).astype(x.dtype)


def rotary_angles(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos and sin ``[..., T, head_dim]`` for integer ``positions [..., T]`` (half-split layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x · cos + rotate_half(x) · sin for ``x [B, T, heads, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    config: DecoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, key_mask, cache, write_index):
        cfg = self.config
        dense = lambda features, name: Dense(features, self.lora_scale, self.dtype, use_bias=False, name=name)
        batch, length, _ = x.shape
        q = dense(cfg.num_heads * cfg.head_dim, "q_proj")(x).reshape(batch, length, cfg.num_heads, cfg.head_dim)
        k = dense(cfg.num_kv_heads * cfg.head_dim, "k_proj")(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        v = dense(cfg.num_kv_heads * cfg.head_dim, "v_proj")(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = rotary_angles(positions, cfg.head_dim, cfg.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, write_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, write_index, 0, 0))
            cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        if cfg.attention != "einsum":
            context = fused_attention(q, k, v, key_mask[:, None], cfg.attention)
            return dense(cfg.hidden_size, "o_proj")(context.reshape(batch, length, -1)), cache
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / jnp.sqrt(cfg.head_dim).astype(self.dtype)
        scores = scores.astype(jnp.float32)
        scores = jnp.where(key_mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        context = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, cfg.num_heads * cfg.head_dim)
        return dense(cfg.hidden_size, "o_proj")(context), cache


class MLP(nn.Module):
    config: DecoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda features, name: Dense(features, self.lora_scale, self.dtype, use_bias=False, name=name)
        hidden = jax.nn.silu(dense(cfg.intermediate_size, "gate_proj")(x)) * dense(cfg.intermediate_size, "up_proj")(x)
        return dense(cfg.hidden_size, "down_proj")(hidden)


class DecoderLayer(nn.Module):
    config: DecoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, key_mask, cache, write_index):
        cfg = self.config
        args = (cfg, self.lora_scale, self.dtype)
        attended, cache = Attention(*args, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x), positions, key_mask, cache, write_index)
        x = x + attended
        x = x + MLP(*args, name="mlp")(RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, cache


class DecoderStack(nn.Module):
    """The blocks ``layer_0 … layer_{L-1}`` (HF's ``model.layers``), or with ``scan_layers``
    one block under ``nn.scan`` (module ``stacked``: parameters, adapters and the key/value
    cache with a leading layer axis), so that compile time no longer grows with depth."""

    config: DecoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x, positions, key_mask, caches, write_index):
        if self.scan_layers:
            layer = rematerialized(DecoderLayer, self.config.remat, scanned=True)
            blocks = scan_blocks(layer, self.config.num_layers,
                                 (nn.broadcast, nn.broadcast, 0, nn.broadcast))
            return blocks(self.config, self.lora_scale, self.dtype, name=STACKED)(
                x, positions, key_mask, caches, write_index)
        new_caches = []
        layer = rematerialized(DecoderLayer, self.config.remat)
        for index in range(self.config.num_layers):
            layer_cache = None if caches is None else caches[index]
            x, layer_cache = layer(self.config, self.lora_scale, self.dtype, name=f"layer_{index}")(
                x, positions, key_mask, layer_cache, write_index)
            new_caches.append(layer_cache)
        return x, new_caches


class LlamaForCausalLM(nn.Module):
    """Token ids in, next-token logits out (float32), with an optional key/value cache.

    ``__call__(input_ids [B, T], attention_mask [B, T] | None, cache | None, last | None)``
    returns ``(logits [B, T, vocab], cache)`` (``[B, last, vocab]`` with ``last``: only the
    final positions); ``return_hidden=True`` returns the final normalized hidden states
    ``[B, T, d]`` instead of logits. Without a cache, attention is causal over the T
    tokens and padding (mask 0) is never attended to; positions count real tokens only, so
    left-padded prompts get the same positions as unpadded ones. With a cache (from
    :func:`init_cache`), the T new tokens are written at ``cache["index"]`` and attend to
    every valid earlier slot. ``prefix [B, P, d]`` (e.g. projected image tokens of a
    vision-language model) is placed before the token embeddings as P more real positions;
    outputs then cover P + T positions.
    """

    config: DecoderConfig
    lora_scale: float = 1.0
    dtype: Any = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 cache: Mapping[str, Any] | None = None, last: int | None = None,
                 return_hidden: bool = False, prefix: Array | None = None) -> tuple[Array, Any]:
        cfg = self.config
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                         name="embed_tokens")
        x = embed(input_ids).astype(self.dtype)
        if prefix is not None:
            if prefix.ndim != 3 or prefix.shape[0] != batch or prefix.shape[2] != cfg.hidden_size:
                raise ValueError(f"prefix must be [batch={batch}, P, hidden={cfg.hidden_size}], got {prefix.shape}")
            x = jnp.concatenate([prefix.astype(self.dtype), x], axis=1)
            attention_mask = jnp.concatenate([jnp.ones(prefix.shape[:2], attention_mask.dtype), attention_mask], 1)
            length += prefix.shape[1]
        real = attention_mask > 0
        if cache is None:
            positions = jnp.cumsum(real, axis=-1) - 1
            causal = jnp.tril(jnp.ones((length, length), bool))
            key_mask = causal[None] & real[:, None, :]  # [B, T, S=T]
            write_index, slots = 0, None
        else:
            write_index = cache["index"]
            seen = jnp.sum(cache["mask"], axis=-1, keepdims=True)  # real tokens already cached
            positions = seen + jnp.cumsum(real, axis=-1) - 1
            slots = jax.lax.dynamic_update_slice(cache["mask"], real, (0, write_index))
            size = slots.shape[1]
            # Token t (written at slot index + t) sees valid slots up to and including its own.
            visible = jnp.arange(size)[None, :] <= (write_index + jnp.arange(length))[:, None]
            key_mask = visible[None] & slots[:, None, :]  # [B, T, S]
        positions = jnp.maximum(positions, 0)
        x, new_layers = DecoderStack(cfg, self.lora_scale, self.dtype, self.scan_layers, name="layers")(
            x, positions, key_mask, None if cache is None else cache["layers"], write_index)
        x = RMSNorm(cfg.rms_norm_eps, name="norm")(x)
        if return_hidden:
            return x.astype(jnp.float32), None
        if last is not None:
            # Only the answer positions need the vocabulary projection, the costliest matmul of
            # a small model (49152 x 576 per token for SmolLM2); prompts are left-padded, so
            # the answer is always at the end.
            x = x[:, -last:]
        if cfg.tie_embeddings:
            logits = embed.attend(x.astype(jnp.float32))
        else:
            logits = Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")(x)
        new_cache = None if cache is None else {
            "layers": new_layers, "mask": slots, "index": write_index + length}
        return logits.astype(jnp.float32), new_cache


def init_cache(config: DecoderConfig, batch: int, size: int, dtype: Any = jnp.float32,
               stacked: bool = False) -> dict:
    """An empty key/value cache for ``batch`` sequences of up to ``size`` tokens.

    ``{"layers": [{"k", "v": [B, size, kv_heads, head_dim]}] * L, "mask": [B, size] bool
    (slots holding a real token), "index": next slot to write}``; ``stacked`` (for a model
    with ``scan_layers``): ``"layers"`` is one ``{"k", "v": [L, B, size, kv_heads, head_dim]}``.
    """
    shape = (batch, size, config.num_kv_heads, config.head_dim)
    if stacked:
        layers = {name: jnp.zeros((config.num_layers, *shape), dtype) for name in ("k", "v")}
        return {"layers": layers, "mask": jnp.zeros((batch, size), bool), "index": jnp.int32(0)}
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_layers)]
    return {"layers": layers, "mask": jnp.zeros((batch, size), bool), "index": jnp.int32(0)}


def greedy_generate(model: LlamaForCausalLM, variables: Mapping[str, Any], input_ids: Array,
                    attention_mask: Array, max_new_tokens: int, prefix: Array | None = None) -> Array:
    """Greedy decoding with the key/value cache; jit-able (``max_new_tokens`` static).

    Args:
      model: the decoder.
      variables: ``{"params": ..., "lora": ...}`` (``lora`` optional).
      input_ids: ``[B, T]`` prompts, **left**-padded so that every prompt ends at T − 1.
      attention_mask: ``[B, T]``, 1 for real prompt tokens.
      max_new_tokens: tokens to generate per prompt.
      prefix: optional ``[B, P, d]`` embeddings placed before the prompt (image tokens).

    Returns:
      ``[B, max_new_tokens]`` int32 tokens; after a sequence emits eos, the rest is eos.
    """
    cfg = model.config
    batch, length = input_ids.shape
    length += 0 if prefix is None else prefix.shape[1]
    if length + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {length} tokens plus {max_new_tokens} new tokens exceeds the "
                         f"context of {cfg.max_position_embeddings}")
    if max_new_tokens == 0:
        return jnp.zeros((batch, 0), jnp.int32)
    cache = init_cache(cfg, batch, length + max_new_tokens, model.dtype, stacked=model.scan_layers)
    logits, cache = model.apply(variables, input_ids, attention_mask, cache, prefix=prefix)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
        token, cache, finished = carry
        logits, cache = model.apply(variables, token[:, None], jnp.ones((batch, 1), jnp.int32), cache)
        following = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        finished = finished | (token == cfg.eos_token_id)
        following = jnp.where(finished, cfg.eos_token_id, following)
        return (following, cache, finished), following

    # The prefill already gave the first token: max_new_tokens − 1 decode steps remain.
    finished = jnp.zeros((batch,), bool)
    _, rest = jax.lax.scan(step, (first, cache, finished), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)
