"""The ``tracking`` section of a run's config."""

from __future__ import annotations

import dataclasses

from celora_jax._checks import ConfigError, check_fields, comma_list

BACKENDS = ("tensorboard", "mlflow", "wandb")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where a run's records go besides ``metrics.jsonl``.

    Attributes:
      backends: comma-separated writers, any of "tensorboard" (event files under
        ``<directory>/tensorboard/<experiment>/<run>``, ``tensorboard --logdir``) and "mlflow"
        (a local store ``<directory>/mlflow``: an SQLite database and its artifacts, one
        MLflow experiment per ``experiment``, one run per method and seed) and "wandb"
        (Weights & Biases in offline mode: ``<directory>/wandb/offline-run-*``, one project
        per ``experiment``, for ``wandb sync`` later); "" (default) writes none. Each is an
        optional extra: ``pip install 'celora-jax[tensorboard]'``, ``'celora-jax[mlflow]'``,
        ``'celora-jax[wandb]'``.
      directory: root of the tracking stores; None puts them beside the run's method
        folders (``<output_dir>/<name>/tracking``), so the methods of one call share them.
      experiment: the group the runs belong to (TensorBoard's top folder, MLflow's
        experiment); None: the run's name.
    """

    backends: str = ""
    directory: str | None = None
    experiment: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The backends as a tuple (validated)."""
        return tuple(name for name in comma_list(self.backends) if name)  # a trailing comma is harmless

    def __post_init__(self):
        check_fields(self, "tracking")
        unknown = sorted(set(self.names) - set(BACKENDS))
        if unknown:
            raise ConfigError(f"tracking.backends: unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"tracking.backends names a backend twice: {self.backends!r}")
        if self.experiment is not None and not self.experiment.strip():
            raise ConfigError("tracking.experiment must be a non-empty name or None")
