"""Export adapters as PEFT-compatible LoRA folders (safetensors only, never pickle).

A tri-matrix adapter A·C·B is written as the standard LoRA pair (A, C·B), so any tool that
knows two-factor LoRA (Hugging Face PEFT, merging scripts) can use a client's adapter:

    directory/adapter_model.safetensors   lora_A.weight [r, d_in], lora_B.weight [d_out, r]
    directory/adapter_config.json         peft_type LORA, r, lora_alpha, target_modules

Module names follow HF ``BertModel`` (``encoder.layer.0.attention.self.query``), i.e. the
adapter applies to the bare encoder that ``PeftModel.from_pretrained(BertModel, directory)``
wraps; decoder adapters (``layers/layer_0/self_attn/q_proj``, also inside a VLM's
``decoder``) follow HF ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``), for
``PeftModel.from_pretrained(LlamaForCausalLM, directory)``. LayerNorms/RMSNorm scales, the
task head and a VLM's projector, which clients also train, are not part of a LoRA folder;
they stay in the run's checkpoints.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping

import numpy as np
from flax import traverse_util

from celora_jax.lora import adapters as adapters_lib
from celora_jax.models.loading import hf_module_path

_PEFT_PREFIX = "base_model.model."


def hf_module_name(module_path: tuple[str, ...]) -> str:
    """Our module path as an HF module name: ``backbone/encoder/layer_0/...`` (BERT) to
    ``encoder.layer.0...``; ``[decoder/]layers/layer_0/...`` (Llama) to ``model.layers.0...``."""
    parts = [p for p in module_path if p not in ("backbone", "decoder")]
    if parts[:1] == ["layers"]:
        return "model." + ".".join(p[len("layer_"):] if p.startswith("layer_") else p for p in parts)
    return ".".join(p.replace("layer_", "layer.") if p.startswith("layer_") else p for p in parts)


def our_module_path(hf_name: str) -> tuple[str, ...]:
    """Inverse of :func:`hf_module_name` (without ``backbone``/``decoder``)."""
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 2:
        return ("layers", f"layer_{parts[2]}", *parts[3:])
    return hf_module_path(hf_name)


def export_peft(adapters: Mapping, directory: str | pathlib.Path, *, rank: int, alpha: float,
                base_model: str | None = None) -> pathlib.Path:
    """Writes one client's adapters (no client axis) as a PEFT LoRA folder.

    Args:
      adapters: the client's adapter pytree (tri-matrix or two-factor); a ``stacked``
        module (layers under ``nn.scan``) is written as one PEFT module per layer.
      directory: output folder (created).
      rank: r.
      alpha: LoRA alpha; the scale alpha / r is the same in PEFT and here.
      base_model: recorded as ``base_model_name_or_path``.

    Returns:
      ``directory``.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> from celora_jax import AdapterConfig, export_peft, init_adapters, load_peft
      >>> params = {"encoder": {"layer_0": {"query": {"kernel": jnp.zeros((8, 8))}}}}
      >>> adapters = init_adapters(jax.random.key(0), params, AdapterConfig(rank=2, target="kernel"))
      >>> folder = export_peft(adapters, tempfile.mkdtemp(), rank=2, alpha=2.0)
      >>> sorted(p.name for p in folder.iterdir())
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> pairs, peft_config = load_peft(folder)
      >>> peft_config["target_modules"], pairs["encoder"]["layer_0"]["query"]["A"].shape
      (['encoder.layer.0.query'], (8, 2))
    """
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, names = {}, []
    # PEFT names one module per layer: stacked (nn.scan) adapters are written per layer.
    per_layer = adapters_lib.unstack_layers(adapters)
    for module_path, pair in sorted(adapters_lib.adapter_modules(adapters_lib.to_two_factor(per_layer)).items()):
        if np.ndim(pair["A"]) != 2:
            raise ValueError(f"export_peft takes one client's adapters; {module_path} has A of shape "
                             f"{np.shape(pair['A'])} (select a client first)")
        name = hf_module_name(module_path)
        names.append(name)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(pair["A"], np.float32).T)
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(pair["B"], np.float32).T)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": names,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_peft(directory: str | pathlib.Path) -> tuple[dict, dict]:
    """Reads a PEFT LoRA folder back as ``(two-factor adapters without 'backbone', config)``.

    The adapters are ``{module path: {"A": [d_in, r], "B": [r, d_out]}}`` (our layout, i.e.
    PEFT's ``lora_A.weight`` and ``lora_B.weight`` transposed); the config is the parsed
    ``adapter_config.json``.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> from celora_jax import AdapterConfig, export_peft, init_adapters, load_peft
      >>> params = {"encoder": {"layer_0": {"value": {"kernel": jnp.zeros((8, 8))}}}}
      >>> adapters = init_adapters(jax.random.key(0), params, AdapterConfig(rank=2, target="kernel"))
      >>> adapters = jax.tree.map(lambda x: x + 0.1, adapters)
      >>> pairs, _ = load_peft(export_peft(adapters, tempfile.mkdtemp(), rank=2, alpha=2.0))
      >>> two_factor = pairs["encoder"]["layer_0"]["value"]   # A and C·B
      >>> original = adapters["encoder"]["layer_0"]["value"]
      >>> bool(jnp.allclose(two_factor["A"] @ two_factor["B"], original["A"] @ original["C"] @ original["B"]))
      True
      >>> load_peft(tempfile.mkdtemp())
      Traceback (most recent call last):
      ...
      ValueError: load_peft: ... is not a PEFT LoRA folder (adapter_config.json is missing)

    Raises:
      ValueError: the folder or one of its two files is missing.
    """
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (directory / name).is_file():
            raise ValueError(f"load_peft: {directory} is not a PEFT LoRA folder ({name} is missing)")
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    flat = {}
    for key, value in tensors.items():
        name, factor = key[len(_PEFT_PREFIX):].rsplit(".lora_", 1)
        flat[our_module_path(name) + (factor[0],)] = value.T
    return traverse_util.unflatten_dict(flat), config

