"""One small writer interface and its backends (TensorBoard via tensorboardX, MLflow's
local file store). Each backend is imported only when a run asks for it."""

from __future__ import annotations

import json
import math
import os
import pathlib
import secrets
import time
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


def _import(backend: str):
    module, extra = EXTRAS[backend]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"tracking.backends={backend!r} needs the {backend} extra: pip install '{extra}'") from None


def check_backends(names) -> None:
    """Refuses a backend whose package is missing, before anything runs."""
    for name in names:
        _import(name)


class TensorBoardWriter:
    """Event files under ``logdir`` (tensorboardX). On resume, steps from ``purge_step`` on
    that an interrupted run had written are purged by TensorBoard itself."""

    def __init__(self, logdir: pathlib.Path, purge_step: int | None):
        tensorboardx = _import("tensorboard")
        self.logdir = logdir
        self._writer = tensorboardx.SummaryWriter(logdir=str(logdir), purge_step=purge_step)
        self._hparams: dict[str, Any] = {}

    def hyperparameters(self, values):
        self._hparams = dict(values)
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted(values.items()))
        self._writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def scalars(self, step, values):
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def histogram(self, step, name, values):
        self._writer.add_histogram(name, np.asarray(values, np.float64), step)

    def image(self, step, name, image):
        self._writer.add_image(name, np.asarray(image, np.float32), step, dataformats="HW")

    def summary(self, values):
        if self._hparams:  # TensorBoard's HParams view: the config beside the final metrics
            self._writer.add_hparams(self._hparams, {f"final/{k}": v for k, v in values.items()}, name="hparams")

    def close(self):
        self._writer.close()


class MlflowWriter:
    """One run in a local MLflow store under ``store``: an SQLite database (``mlflow.db``)
    and its artifacts (``artifacts/``). MLflow 3 keeps its plain file store in maintenance
    mode and refuses it by default, so the local store is SQLite. The run's id is kept in
    ``state_file`` so that a resumed run logs into the same MLflow run, skipping the steps
    it already holds."""

    def __init__(self, store: pathlib.Path, experiment: str, run_name: str, tags: dict[str, str],
                 state_file: pathlib.Path, resume: bool):
        _import("mlflow")
        from mlflow.tracking import MlflowClient

        store = store.resolve()
        store.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=mlflow_uri(store))
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=(store / "artifacts" / experiment).as_uri())
        self.logged_step = 0
        if resume and state_file.exists():
            self.run_id = json.loads(state_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            history = [m.step for key in self.client.get_run(self.run_id).data.metrics
                       for m in self.client.get_metric_history(self.run_id, key)]
            self.logged_step = max(history, default=0)
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
            state_file.parent.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps({"run_id": self.run_id, "experiment_id": experiment_id}))

    def hyperparameters(self, values):
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in sorted(values.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def scalars(self, step, values):
        if step <= self.logged_step:  # written before the interruption (the same values: exact resume)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in sorted(values.items())]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def histogram(self, step, name, values):
        if step > self.logged_step:  # MLflow has no histograms: the values as a JSON artifact
            self.client.log_dict(self.run_id, {"round": step, name: [float(v) for v in values]},
                                 f"{name}/round_{step:04d}.json")

    def image(self, step, name, image):
        if step > self.logged_step:
            pixels = (255 * np.clip(np.asarray(image, np.float64), 0, 1)).astype(np.uint8)
            self.client.log_image(self.run_id, pixels, key=name.replace("/", "_"), step=step)

    def summary(self, values):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"final/{k}", v, now, 0) for k, v in sorted(values.items())])

    def close(self):
        self.client.set_terminated(self.run_id)


class WandbWriter:
    """An offline Weights & Biases run under ``root`` (``wandb/offline-run-*``; ``wandb sync``
    uploads it later, from a machine with network). Its id and last step are kept in
    ``state_file``, so that a resumed run continues the same W&B run (``resume="allow"``)
    from the next step: W&B refuses steps that go back."""

    def __init__(self, root: pathlib.Path, experiment: str, run_name: str, tags: dict[str, str],
                 state_file: pathlib.Path, resume: bool):
        self._wandb = _import("wandb")
        root.mkdir(parents=True, exist_ok=True)
        self.state_file = state_file
        state = json.loads(state_file.read_text()) if resume and state_file.exists() else {}
        self.last_step, self._live_step = int(state.get("last_step", 0)), None
        run_id = state.get("run_id") or secrets.token_hex(6)  # W&B ids: lowercase letters and digits
        self.run = self._wandb.init(project=experiment, name=run_name, dir=str(root), mode="offline", id=run_id,
                                    resume="allow", tags=[f"{k}={v}" for k, v in sorted(tags.items())],
                                    group=tags.get("setting"), job_type=tags.get("method"),
                                    settings=self._wandb.Settings(silent=True, console="off"))
        self._save(run_id)

    def _save(self, run_id: str | None = None) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"run_id": run_id or self.run.id, "last_step": self.last_step}))

    def hyperparameters(self, values):
        self.run.config.update(values, allow_val_change=True)

    def scalars(self, step, values):
        if step <= self.last_step:  # logged before the interruption (the same values: exact resume)
            return
        self.run.log(dict(values), step=step)
        self.last_step = self._live_step = step
        self._save()

    def histogram(self, step, name, values):
        if step == self._live_step:  # a step whose scalars this process logged
            self.run.log({name: self._wandb.Histogram(np.asarray(values, np.float64))}, step=step)

    def image(self, step, name, image):
        if step == self._live_step:
            pixels = (255 * np.clip(np.asarray(image, np.float64), 0, 1)).astype(np.uint8)
            self.run.log({name: self._wandb.Image(pixels)}, step=step)

    def summary(self, values):
        self.run.summary.update({f"final/{k}": v for k, v in values.items()})

    def close(self):
        self.run.finish()


def mlflow_uri(store: pathlib.Path) -> str:
    """The tracking URI of the local store under ``store`` (``mlflow ui --backend-store-uri``)."""
    return f"sqlite:///{pathlib.Path(store).resolve() / 'mlflow.db'}"


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
