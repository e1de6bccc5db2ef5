"""Experiment tracking (issue 44): TensorBoard and MLflow writers, read back with the
backends' own readers and compared with metrics.jsonl; resume appends without duplicated
steps; bad input."""

import json
import shutil

import numpy as np
import pytest
from helpers import tiny_config

from celora_jax.federated import engine
from celora_jax.federated.config import ConfigError, RunConfig, apply_overrides
from celora_jax.federated.tracking import flatten_config, round_scalars


def _tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}, events


def _mlflow_run(store, experiment):
    from mlflow.tracking import MlflowClient

    from celora_jax.federated.tracking.mlflow_store import mlflow_uri

    client = MlflowClient(tracking_uri=mlflow_uri(store))
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, runs


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_runs_write_tensorboard_and_mlflow_that_read_back_as_metrics_jsonl(tmp_path, tiny_model_dir):
    config = apply_overrides(tiny_config(tiny_model_dir, "celora"), ["federation.rounds=3",
                             "tracking.backends=tensorboard,mlflow", "federation.eval_every=2"])
    run_dir = tmp_path / "tiny" / "celora"
    engine.run(config, output_dir=run_dir)
    records = _records(run_dir)
    root = tmp_path / "tiny" / "tracking"
    scalars, events = _tensorboard_scalars(root / "tensorboard" / "tiny" / "celora")
    for record in records:
        for key, value in round_scalars(record).items():
            assert scalars[key][record["round"]] == pytest.approx(value, rel=1e-6), key
    evaluated = [r["round"] for r in records if "client_test_accuracy" in r]
    assert evaluated == [2, 3]
    assert [h.step for h in events.Histograms("client_test_accuracy")] == evaluated
    assert [i.step for i in events.Images("weights")] == evaluated
    client, runs = _mlflow_run(root / "mlflow", "tiny")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["method"] == "celora" and run.data.tags["seed"] == "0" and run.info.status == "FINISHED"
    assert run.data.params["federation.rounds"] == "3" and run.data.params["adapter.rank"] == "8"
    for key in ("train_loss", "bytes_cumulative", "test_accuracy_mean"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == {r["round"]: pytest.approx(r[key], rel=1e-6) for r in records if key in r}, key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["final/test_accuracy_mean"] == pytest.approx(summary["test_accuracy_mean"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "client_test_accuracy")}
    assert artifacts == {"client_test_accuracy/round_0002.json", "client_test_accuracy/round_0003.json"}


def test_a_resumed_run_logs_each_step_once(tmp_path, tiny_model_dir):
    """Interrupted after round 2 (its round-3 checkpoint and summary lost), then resumed:
    TensorBoard purges what the interrupted run wrote from round 3 on; MLflow and W&B keep
    their steps and the resumed run adds only new ones, in the same run."""
    config = apply_overrides(tiny_config(tiny_model_dir, "fedavg_lora"), ["federation.rounds=3",
                             "tracking.backends=tensorboard,mlflow,wandb", "checkpoint.every=1",
                             "checkpoint.keep=3"])
    run_dir = tmp_path / "tiny" / "fedavg_lora"
    engine.run(config, output_dir=run_dir)
    before = _records(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "3")
    (run_dir / "summary.json").unlink()
    engine.run(config, output_dir=run_dir, resume=True)
    after = _records(run_dir)
    assert [r["round"] for r in after] == [1, 2, 3]
    root = tmp_path / "tiny" / "tracking"
    scalars, _ = _tensorboard_scalars(root / "tensorboard" / "tiny" / "fedavg_lora")
    assert sorted(scalars["train_loss"]) == [1, 2, 3]
    assert scalars["train_loss"][3] == pytest.approx(after[-1]["train_loss"], rel=1e-6)
    client, runs = _mlflow_run(root / "mlflow", "tiny")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert steps == [1, 2, 3]
    np.testing.assert_allclose([r["train_loss"] for r in after], [r["train_loss"] for r in before], rtol=1e-6)
    # W&B: the resumed process continues the same run id and logs no step twice.
    steps = [json.loads(item.value_json) for run_file in sorted((root / "wandb").glob("offline-run-*/run-*.wandb"))
             for record in _wandb_records(run_file) if record.WhichOneof("record_type") == "history"
             for item in record.history.item if "/".join(item.nested_key) == "_step"]
    assert sorted(steps) == [1, 2, 3]
    assert len({p.name for p in (root / "wandb").glob("offline-run-*/run-*.wandb")}) == 1  # one run id


def test_tracking_bad_input(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown backend"):
        apply_overrides(RunConfig(), ["tracking.backends=tensorboard,wandbx"])
    with pytest.raises(ConfigError, match="twice"):
        apply_overrides(RunConfig(), ["tracking.backends=mlflow,mlflow"])
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    from celora_jax.federated.tracking import check_backends

    with pytest.raises(ConfigError, match=r"pip install 'celora-jax\[mlflow\]'"):
        check_backends(("mlflow",))


def test_flatten_config_gives_scalar_hyperparameters():
    flat = flatten_config({"federation": {"rounds": 3, "method_options": {}}, "adapter": {"init": None},
                           "name": "x", "grid": [1, 2]})
    assert flat == {"federation.rounds": 3, "federation.method_options": "{}", "adapter.init": "null", "name": "x",
                    "grid": "[1, 2]"}


def _wandb_records(run_file):
    """The records of an offline W&B run file (``run-<id>.wandb``): W&B's LevelDB-style log
    of its own protobuf ``Record`` messages (the reader wandb's Python package had before
    its Go core, re-done here: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, position = [], b"", 7
    block = 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # the block's tail is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_reads_back_as_metrics_jsonl(tmp_path, tiny_model_dir):
    config = apply_overrides(tiny_config(tiny_model_dir, "celora"), ["tracking.backends=wandb"])
    run_dir = tmp_path / "tiny" / "celora"
    engine.run(config, output_dir=run_dir)
    records = _records(run_dir)
    run_files = list((tmp_path / "tiny" / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    logged = _wandb_records(run_files[0])
    history = {}
    for record in logged:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history.setdefault(int(json.loads(items["_step"])), {}).update(items)
    assert sorted(history) == [r["round"] for r in records]
    for record in records:
        assert json.loads(history[record["round"]]["train_loss"]) == pytest.approx(record["train_loss"], rel=1e-6)
    assert json.loads(history[records[-1]["round"]]["client_test_accuracy/_type"]) == "histogram"
    assert json.loads(history[records[-1]["round"]]["weights/_type"]) == "image-file"
    configs = [r for r in logged if r.WhichOneof("record_type") == "config"]
    keys = {item.key for r in configs for item in r.config.update}
    assert "federation.rounds" in keys
    state = json.loads((run_dir / "tracking_wandb.json").read_text())
    assert state["last_step"] == records[-1]["round"] and run_files[0].name == f"run-{state['run_id']}.wandb"
