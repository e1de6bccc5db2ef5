"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import importlib.util
from pathlib import Path

from celora_jax.data.partition import PartitionConfig
from celora_jax.federated.config import FederationConfig, ModelConfig, RunConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_module(name: str):
    """Imports ``benchmarks/<name>.py`` (to run its ``--smoke`` variant in a test)."""
    spec = importlib.util.spec_from_file_location(f"_celora_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def xla_flags(*flags: str) -> str:
    """$XLA_FLAGS (the suite's optimization level, tests/conftest.py) plus ``flags``, for a
    subprocess's environment: its programs then compile as the test process's do."""
    import os

    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def tiny_config(model_dir, method="celora", **federation):
    # All clients at once unless a test asks for blocks: CPU's "auto" (one client at a time,
    # under lax.map) compiles ~20% slower, and client blocks have tests of their own.
    federation = {"client_block": None, **federation}
    return RunConfig(
        name="tiny",
        model=ModelConfig(path=str(model_dir), max_length=16),
        partition=PartitionConfig(num_clients=5, alpha=0.5, train_examples=16, test_examples=8,
                                  global_test_examples=16),
        federation=FederationConfig(method=method, rounds=2, batch_size=8, **federation),
    )


def write_hf_llama(params, config, directory):
    """Writes our Llama parameters and ``DecoderConfig`` as an HF ``LlamaForCausalLM``
    directory (config.json + model.safetensors), which transformers and our loader both read."""
    import json

    import numpy as np
    import transformers
    from flax import traverse_util
    from safetensors.numpy import save_file

    tensors = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        if path == ("embed_tokens", "embedding"):
            tensors["model.embed_tokens.weight"] = value
        elif path == ("lm_head", "kernel"):
            tensors["lm_head.weight"] = np.ascontiguousarray(value.T)
        elif path == ("norm", "scale"):
            tensors["model.norm.weight"] = value
        elif path[-1] == "scale":
            tensors[f"model.layers.{path[1][6:]}.{path[2]}.weight"] = value
        else:  # torch Linear stores [out, in]
            tensors[f"model.layers.{path[1][6:]}.{path[2]}.{path[3]}.weight"] = np.ascontiguousarray(value.T)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=config.max_position_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id)
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(directory) / "model.safetensors"))
    (Path(directory) / "config.json").write_text(json.dumps(hf_config.to_dict()))
    return Path(directory)
