"""Experiment tracking: a run's records in the tools researchers already open.

``tracking.backends`` names the writers (``tensorboard``, ``mlflow``, ``wandb``: one module
each); each is an optional extra (``pip install 'celora-jax[tensorboard]'``, ...). Every writer
gets the same calls from the engine (``celora_jax.federated.engine``): the resolved config
as hyperparameters once, every round's scalars with the round as step, each evaluated
round's per-client test accuracies as a histogram and the aggregation weights W as an
image, and the summary at the end. ``metrics.jsonl`` stays the record of truth; the writers
are views of it.
"""

from celora_jax.federated.tracking.base import Writer, check_backends, flatten_config, round_scalars
from celora_jax.federated.tracking.config import BACKENDS, TrackingConfig
from celora_jax.federated.tracking.writers import RunTracker, open_writers, run_tags

__all__ = ["BACKENDS", "RunTracker", "TrackingConfig", "Writer", "check_backends", "flatten_config", "open_writers",
           "round_scalars", "run_tags"]
