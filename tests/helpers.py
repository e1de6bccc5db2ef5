"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_module(name: str):
    """Imports ``benchmarks/<name>.py``, whose float64 numpy code is an independent reference."""
    spec = importlib.util.spec_from_file_location(f"_celora_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
