"""What a run writes: ``config.json``, ``metrics.jsonl`` (one line per round),
``summary.json`` and, on request, one PEFT LoRA folder per client.

Resuming keeps the interrupted run's files untouched until its checkpoint has restored:
only then are the lines of rounds lost with the checkpoint dropped.
"""

from __future__ import annotations

import json
import pathlib

import jax

from celora_jax.models.export import export_peft


class RunFiles:
    """The files of one method's run under ``directory`` (None: write nothing)."""

    def __init__(self, directory: str | pathlib.Path | None, config_text: str, resume: bool):
        self.directory = None if directory is None else pathlib.Path(directory)
        self.config_text, self.resume, self.history, self._touched = config_text, resume, [], False
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metrics = self.directory / "metrics.jsonl"
        if resume:
            if self.metrics.exists():
                self.history = [json.loads(line) for line in self.metrics.read_text().splitlines() if line]
        else:
            (self.directory / "config.json").write_text(config_text)
            self.metrics.write_text("")

    def add(self, record: dict) -> list[dict]:
        """Appends a round's record; returns the records so far (of this and an interrupted run)."""
        if self.resume and not self._touched:
            # The checkpoint restored fine: only now touch the files of the interrupted run.
            # Rounds after the checkpoint were lost with it, so their lines go.
            self._touched = True
            self.history = [r for r in self.history if r["round"] < record["round"]]
            if self.directory is not None:
                self.metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history))
                (self.directory / "config.json").write_text(self.config_text)
        self.history.append(record)
        if self.directory is not None:
            with open(self.metrics, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        return self.history

    def write_summary(self, summary: dict) -> None:
        if self.directory is not None:
            (self.directory / "summary.json").write_text(json.dumps(summary, indent=2))


def export_clients(lora, adapter_config, base_model: str, directory: pathlib.Path) -> None:
    """One PEFT LoRA folder per client, ``directory/client_0000`` ..., from client-stacked
    adapters ``lora`` (factors A and C·B for tri-matrix adapters)."""
    lora = jax.device_get(lora)
    num_clients = jax.tree.leaves(lora)[0].shape[0]
    for client in range(num_clients):
        export_peft(jax.tree.map(lambda x: x[client], lora), directory / f"client_{client:04d}",
                    rank=adapter_config.rank, alpha=adapter_config.scale * adapter_config.rank,
                    base_model=base_model)
