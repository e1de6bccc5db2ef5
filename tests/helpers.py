"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import importlib.util
from pathlib import Path

from celora_jax.config import FederationConfig, ModelConfig, RunConfig
from celora_jax.data.partition import PartitionConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_module(name: str):
    """Imports ``benchmarks/<name>.py``, whose float64 numpy code is an independent reference."""
    spec = importlib.util.spec_from_file_location(f"_celora_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(model_dir, method="celora", **federation):
    return RunConfig(
        name="tiny",
        model=ModelConfig(path=str(model_dir), max_length=16),
        partition=PartitionConfig(num_clients=5, alpha=0.5, train_examples=16, test_examples=8,
                                  global_test_examples=16),
        federation=FederationConfig(method=method, rounds=2, batch_size=8, **federation),
    )
