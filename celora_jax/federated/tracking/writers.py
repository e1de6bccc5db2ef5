"""The run's writers: which backends ``tracking`` asks for, where their stores go, and the
tracker the engine and the Flower ServerApp feed with records."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from celora_jax._checks import ConfigError
from celora_jax.federated.tracking.base import Writer, flatten_config, round_scalars
from celora_jax.federated.tracking.mlflow_store import MlflowWriter
from celora_jax.federated.tracking.tensorboard import TensorBoardWriter
from celora_jax.federated.tracking.wandb_offline import WandbWriter


def run_tags(config, method: str, adapter_config, **extra: str) -> dict[str, str]:
    """How a run is labelled in the trackers, by the engine and the Flower ServerApp alike:
    method, setting (the run's name), seed, rank and adapter init as the method resolves them
    (``fed_sb``'s unset init is ``weight_svd``), plus ``extra``."""
    return {"method": method, "setting": config.name, "seed": str(config.seed), "rank": str(adapter_config.rank),
            "adapter_init": str(adapter_config.init), **extra}


def tracking_root(config, output_dir: pathlib.Path | None) -> pathlib.Path:
    """``tracking.directory``, else ``tracking`` beside the run's method folder."""
    if config.tracking.directory:
        return pathlib.Path(config.tracking.directory)
    if output_dir is None:
        raise ConfigError("tracking.backends needs a place for its stores: an output directory or "
                          "tracking.directory")
    return pathlib.Path(output_dir).parent / "tracking"


def open_writers(config, output_dir: pathlib.Path | None, tags: dict[str, str], resume: bool,
                 first_round: int) -> list[Writer]:
    """The writers ``config.tracking`` asks for, for the run writing to ``output_dir``
    (``first_round``: the round this process starts from, 1 unless resumed)."""
    names = config.tracking.names
    if not names:
        return []
    root = tracking_root(config, output_dir)
    experiment = config.tracking.experiment or config.name
    run_dir = pathlib.Path(output_dir) if output_dir is not None else root / tags["method"]
    run_name = os.path.relpath(run_dir.resolve(), root.resolve().parent) if output_dir is not None else tags["method"]
    if run_name.startswith(".."):
        run_name = run_dir.name
    writers: list[Writer] = []
    for name in names:
        if name == "tensorboard":
            writers.append(TensorBoardWriter(root / "tensorboard" / experiment / run_name,
                                             first_round if resume else None))
        elif name == "mlflow":
            writers.append(MlflowWriter(root / "mlflow", experiment, run_name, tags,
                                        run_dir / "tracking_mlflow.json", resume))
        else:
            writers.append(WandbWriter(root, experiment, run_name, tags, run_dir / "tracking_wandb.json", resume))
    return writers


class RunTracker:
    """The writers of one run, fed from its records (``celora_jax.federated.engine``): opened
    at the first record (which tells the round a resumed run starts from), closed always."""

    def __init__(self, config, output_dir, tags: dict[str, str], resume: bool, config_dict: dict,
                 enabled: bool = True):
        self.config, self.output_dir, self.tags, self.resume = config, output_dir, tags, resume
        self.config_dict, self.writers, self._opened = config_dict, [], False
        self.enabled = enabled and bool(config.tracking.names)

    def add(self, record: dict) -> None:
        if not self.enabled:
            return
        step = int(record["round"])
        if not self._opened:
            self._opened = True
            self.writers = open_writers(self.config, self.output_dir, self.tags, self.resume, step)
            if not self.resume:
                for writer in self.writers:
                    writer.hyperparameters(flatten_config(self.config_dict))
        scalars = round_scalars(record)
        fed = self.config.federation
        pictured = step % fed.eval_every == 0 or step == fed.rounds  # the evaluation schedule
        for writer in self.writers:
            writer.scalars(step, scalars)
            if "client_test_accuracy" in record:
                writer.histogram(step, "client_test_accuracy", record["client_test_accuracy"])
            if pictured:
                for name, value in record.items():  # W and the distance matrices
                    matrix = np.asarray(value, np.float64) if isinstance(value, list) and value and \
                        isinstance(value[0], list) else None
                    if matrix is not None and matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1]:
                        scale = np.abs(matrix).max()
                        writer.image(step, name, np.abs(matrix) / scale if scale > 0 else matrix)

    def finish(self, summary: dict) -> None:
        for writer in self.writers:
            writer.summary(round_scalars(summary))

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []
