"""A federated run end to end: ``run(config)`` prepares the method and the task, loops over
the rounds (one compiled program per round, ``celora_jax.federated.round``) and writes the
run's files.

  prepare          celora_jax.federated.setup         method object, task, roles
  tasks            celora_jax.federated.tasks         model and data per architecture
  round            celora_jax.federated.round         the jitted round and evaluation
  loop             celora_jax.federated.loop          state, resume, batches, records
  files            celora_jax.federated.runfiles      config/metrics/summary, PEFT export
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
from typing import Any

import jax
import numpy as np

from celora_jax.federated import checkpoint, client_ranks, compile_cache, sharding, tracking
from celora_jax.federated.config import RunConfig, to_dict
from celora_jax.federated.loop import iterate_rounds
from celora_jax.federated.methods import cluster_oracle
from celora_jax.federated.runfiles import RunFiles, export_clients
from celora_jax.federated.setup import Setup, prepare
from celora_jax.lora import roles as roles_lib


@dataclasses.dataclass
class RunResult:
    history: list[dict]
    summary: dict
    client_params: Any = None


def parameter_counts(setup: Setup) -> dict:
    """Numbers of one client's parameters that train (shared and personal) and that travel
    (shared; of those, the adapters' alone: the trained base parameters that travel with
    ``share_base`` cost every method the same), and the adapter init the run used."""
    def count(*roles, part=None):
        selected = roles_lib.select(setup.task.client_params, setup.roles, *roles)
        if part is not None:
            selected = selected.get(part, {})
        return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(selected)))

    counts = {"trainable_params_per_client": count(roles_lib.SHARED, roles_lib.PERSONAL),
              "sent_params_per_client": count(roles_lib.SHARED),
              "sent_adapter_params_per_client": count(roles_lib.SHARED, part="lora"),
              "adapter_init": setup.task.adapter_config.init}
    ranks = client_ranks.ranks_by_client(setup.task.adapter_config, setup.num_clients)
    if ranks is not None:  # the counts above are a full-rank client's
        counts["client_ranks"] = ranks.tolist()
    return counts


def summarize(history: list[dict], setup: Setup) -> dict:
    final = history[-1]
    summary = {
        "method": setup.method.name,
        "description": setup.method.description,
        "rounds": len(history),
        "num_clients": setup.num_clients,
        "test_accuracy_mean": final.get("test_accuracy_mean"),
        "test_accuracy_std": final.get("test_accuracy_std"),
        "global_test_accuracy_mean": final.get("global_test_accuracy_mean"),
        "global_test_accuracy_std": final.get("global_test_accuracy_std"),
        "validation_accuracy_mean": final.get("validation_accuracy_mean"),
        "mb_per_round": final["bytes_round"] / 1e6,
        "mb_up_per_client_round": final["bytes_up_per_client"] / 1e6,
        "mb_down_per_client_round": final["bytes_down_per_client"] / 1e6,
        "mb_total": final["bytes_cumulative"] / 1e6,
        "seconds": float(sum(r["seconds"] for r in history)),
        "processes": jax.process_count(),
        "devices": setup.config.federation.num_devices or jax.device_count(),
        "data_parallel": setup.config.federation.data_parallel,
        # Where it ran: a grid may gather runs from several machines, and float32 products
        # differ between them (a GPU's default precision rounds through TF32).
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        # The clients whose data this process loaded (process 0's share with several).
        "local_clients": list(setup.task.local_clients),
    }
    summary.update(parameter_counts(setup))
    if setup.method.options:
        summary["method_options"] = dict(setup.method.options)
    for name in ("core_share_mean", "self_weight_mean", "weight_in_true_cluster_mean", "others_in_true_cluster_mean"):
        if name in final:
            summary[name] = final[name]
    if setup.task.clusters is not None and len(set(setup.task.clusters.tolist())) > 1:
        summary["true_clusters"] = [int(c) for c in setup.task.clusters]
    elif setup.method.name == cluster_oracle.NAME and cluster_oracle.single_cluster(setup.task.clusters):
        # No result table may call it an oracle without saying so.
        summary["note"] = cluster_oracle.SINGLE_CLUSTER_NOTE
    summary.update(setup.task.preparation)
    if "dp_epsilon" in final:
        summary.update({k: final[k] for k in ("dp_epsilon", "dp_delta", "dp_noise_multiplier")},
                       dp_clip_norm=setup.config.dp.clip_norm)
    return summary


def shared_checkpoint_path(directory: str, name: str, method: str) -> str:
    """Where a run's checkpoints go under ``checkpoint.directory`` (local or ``gs://``)."""
    return f"{directory.rstrip('/')}/{name}/{method}"


def checkpoint_directory(config: RunConfig, output_dir: str | pathlib.Path | None) -> str | pathlib.Path | None:
    """``checkpoint.directory/<name>/<method>`` if set, else ``<output_dir>/checkpoints``."""
    if config.checkpoint.directory:
        return shared_checkpoint_path(config.checkpoint.directory, config.name, config.federation.method)
    return None if output_dir is None else pathlib.Path(output_dir) / "checkpoints"


def run(config: RunConfig, *, progress: bool = False, output_dir: str | pathlib.Path | None = None,
        resume: bool = False) -> RunResult:
    """Prepares and runs one method.

    With ``output_dir``, writes ``config.json``, ``metrics.jsonl`` (one line per round),
    ``summary.json`` and, when ``config.checkpoint.every`` > 0, orbax checkpoints under
    ``checkpoints/``. ``resume=True`` continues from the latest checkpoint there. With
    several processes (``jax.distributed``) every process runs this and only process 0
    writes files and shows progress.
    """
    if output_dir is None and resume:
        raise ValueError("resume needs the output_dir that holds the checkpoints")
    checkpoint_dir = checkpoint_directory(config, output_dir)
    if checkpoint_dir is not None and not resume and checkpoint.has_checkpoints(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} already holds checkpoints of a run; resume it (--resume) "
                         "or choose another output directory")
    if jax.process_index() != 0:
        output_dir, progress = None, False  # every process saves checkpoints, process 0 the rest
    tracking.check_backends(config.tracking.names)  # a missing extra fails before anything loads
    compile_cache.enable(config.compilation_cache)
    setup = prepare(config, progress=progress)
    files = RunFiles(output_dir, json.dumps(to_dict(config), indent=2, sort_keys=True), resume)
    # Process 0 alone logs (the others hold the same records), when tracking.backends names any.
    tags = tracking.run_tags(config, setup.method.name, setup.task.adapter_config)
    tracker = tracking.RunTracker(config, files.directory, tags, resume, to_dict(config),
                                  enabled=jax.process_index() == 0)
    # A resumed run that had already finished yields no rounds: its records are the file's.
    client_params, history = None, files.history
    # Closed on the way out, interrupted or not: the checkpoint manager's threads stop before
    # the interpreter shuts down, and the progress bar ends its line.
    with contextlib.closing(iterate_rounds(setup, checkpoint_dir, resume)) as rounds, contextlib.closing(tracker):
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.federation.rounds, desc=setup.method.name, unit="round")
        with contextlib.closing(bar) if bar is not None else contextlib.nullcontext():
            for record, client_params in rounds:
                history = files.add(record)
                tracker.add(record)
                if bar is not None:  # a resumed run's bar starts at the round it resumes from
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                    acc=f"{record.get('test_accuracy_mean', float('nan')):.3f}",
                                    MB=f"{record['bytes_cumulative'] / 1e6:.2f}", refresh=False)
                    bar.update(record["round"] - bar.n)
        if not history:
            raise ValueError("the run produced no rounds")
        summary = summarize(history, setup)
        tracker.finish(summary)
    if client_params is not None:
        client_params = jax.tree.map(lambda x: x[: setup.num_clients], client_params)  # drop mesh padding
    if config.export_peft and client_params is not None:
        host_params = sharding.to_host(client_params)  # a collective: every process takes part
        if files.directory is not None:
            export_clients(host_params["lora"], setup.task.adapter_config, setup.task.base_model,
                           files.directory / "adapters")
    files.write_summary(summary)
    return RunResult(history, summary, client_params)


__all__ = ["RunResult", "run", "prepare", "summarize", "checkpoint_directory", "shared_checkpoint_path"]
