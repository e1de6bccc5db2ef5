"""A local MLflow store (SQLite and its artifacts), written with MlflowClient."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from celora_jax.federated.tracking.base import import_backend


def mlflow_uri(store: pathlib.Path) -> str:
    """The tracking URI of the local store under ``store`` (``mlflow ui --backend-store-uri``)."""
    return f"sqlite:///{pathlib.Path(store).resolve() / 'mlflow.db'}"


class MlflowWriter:
    """One run in a local MLflow store under ``store``: an SQLite database (``mlflow.db``)
    and its artifacts (``artifacts/``). MLflow 3 keeps its plain file store in maintenance
    mode and refuses it by default, so the local store is SQLite. The run's id is kept in
    ``state_file`` so that a resumed run logs into the same MLflow run, skipping the steps
    it already holds."""

    def __init__(self, store: pathlib.Path, experiment: str, run_name: str, tags: dict[str, str],
                 state_file: pathlib.Path, resume: bool):
        import_backend("mlflow")
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
