"""Weights & Biases runs in offline mode (``wandb sync`` uploads them later)."""

from __future__ import annotations

import json
import pathlib
import secrets

import numpy as np

from celora_jax.federated.tracking.base import import_backend


class WandbWriter:
    """An offline Weights & Biases run under ``root`` (``wandb/offline-run-*``; ``wandb sync``
    uploads it later, from a machine with network). Its id and last step are kept in
    ``state_file``, so that a resumed run continues the same W&B run (``resume="allow"``)
    from the next step: W&B refuses steps that go back."""

    def __init__(self, root: pathlib.Path, experiment: str, run_name: str, tags: dict[str, str],
                 state_file: pathlib.Path, resume: bool):
        self._wandb = import_backend("wandb")
        root.mkdir(parents=True, exist_ok=True)
        self.state_file = state_file
        state = json.loads(state_file.read_text()) if resume and state_file.exists() else {}
        self.last_step, self._live_step = int(state.get("last_step", 0)), None
        self._logged_before = self.last_step
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
        # Steps an interrupted run logged are skipped (the same values: exact resume); the
        # current step may take more values (the Flower server's evaluation), W&B merges them.
        if step <= self._logged_before or step < self.last_step:
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
