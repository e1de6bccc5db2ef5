"""TensorBoard event files, written with tensorboardX (no TensorFlow)."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from celora_jax.federated.tracking.base import import_backend


class TensorBoardWriter:
    """Event files under ``logdir`` (tensorboardX). On resume, steps from ``purge_step`` on
    that an interrupted run had written are purged by TensorBoard itself."""

    def __init__(self, logdir: pathlib.Path, purge_step: int | None):
        tensorboardx = import_backend("tensorboard")
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
