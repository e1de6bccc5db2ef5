"""The writer interface every backend implements, and what the backends share: the
records' numbers, the flattened config, and importing a backend's optional extra."""

from __future__ import annotations

import json
import math
from typing import Any, Protocol

import numpy as np

from celora_jax._checks import ConfigError

EXTRAS = {"tensorboard": ("tensorboardX", "celora-jax[tensorboard]"), "mlflow": ("mlflow", "celora-jax[mlflow]"),
          "wandb": ("wandb", "celora-jax[wandb]")}


class Writer(Protocol):
    """What the engine calls, in this order: ``hyperparameters`` once (not on resume),
    ``scalars`` every round, ``histogram`` and ``image`` on evaluated rounds, ``summary``
    at the end, ``close`` always."""

    def hyperparameters(self, values: dict[str, Any]) -> None: ...
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def histogram(self, step: int, name: str, values: np.ndarray) -> None: ...
    def image(self, step: int, name: str, image: np.ndarray) -> None: ...
    def summary(self, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"federation": {"rounds": 3}}`` -> ``{"federation.rounds": 3}``; values that are not
    scalars (lists, dicts of method options, None) as their JSON text."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def round_scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a round's record (losses, accuracies, bytes, core share, DP ε,
    ...), without the round itself."""
    return {key: float(value) for key, value in record.items()
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def import_backend(backend: str):
    module, extra = EXTRAS[backend]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"tracking.backends={backend!r} needs the {backend} extra: pip install '{extra}'") from None


def check_backends(names) -> None:
    """Refuses a backend whose package is missing, before anything runs."""
    for name in names:
        import_backend(name)
