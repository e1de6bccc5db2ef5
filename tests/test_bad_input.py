"""Bad input across the CLI and library: one clear one-line error, a non-zero exit, and
nothing written over an existing good run."""

import hashlib
import json
import pathlib
import shutil

import pytest
from helpers import tiny_config

from celora_jax.cli import main as cli
from celora_jax.federated.config import CheckpointConfig


def _tree_digest(root: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def good_run(tiny_model_dir, tmp_path_factory):
    """A finished tiny run with checkpoints, written through the library."""
    import dataclasses

    from celora_jax.federated import engine

    config = dataclasses.replace(tiny_config(tiny_model_dir, "celora"), checkpoint=CheckpointConfig(every=1))
    out = tmp_path_factory.mktemp("good") / "tiny" / "celora"
    engine.run(config, output_dir=out)
    return out


@pytest.fixture
def bad_dirs(tmp_path, tiny_model_dir, good_run):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights)
    small_vocab = tmp_path / "small_vocab"
    shutil.copytree(tiny_model_dir, small_vocab)
    config = json.loads((small_vocab / "config.json").read_text())
    config["vocab_size"] = 1000
    (small_vocab / "config.json").write_text(json.dumps(config))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good_run, corrupt)
    for path in (corrupt / "checkpoints" / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    truncated = tmp_path / "truncated"
    shutil.copytree(good_run, truncated)
    for path in (truncated / "checkpoints" / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    shutil.copy(good_run / "config.json", empty_run)
    (tmp_path / "notes.txt").write_text("not a table")
    (tmp_path / "columns.csv").write_text("review,stars\ngood,1\n")
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "one_class.csv").write_text("text,label\ngood,1\nfine,1\n")
    (tmp_path / "two_classes.csv").write_text("text,label\ngood,1\nbad,0\n")
    (tmp_path / "empty.csv").write_text("")
    return {"tmp": tmp_path, "model": tiny_model_dir, "no_weights": no_weights, "small_vocab": small_vocab,
            "corrupt": corrupt, "truncated": truncated, "empty_run": empty_run, "good": good_run}


# (argv with {placeholders}, expected fragment of the one-line error)
CASES = [
    ("run --preset huge", "unknown preset 'huge'"),
    ("run --methods fedavg", "unknown method 'fedavg'"),
    ("run --methods celora,local,celora", "--methods lists celora more than once"),
    ("run --set federation.method_options.fedprox.mu=-1",
     "federation.method_options.fedprox: method 'fedprox': mu must be a finite number >= 0"),
    ("run --set federation.method_options.fedprox.steps=2", "method 'fedprox' has no option 'steps'"),
    ("run --methods fedavg_lora_ft --set federation.method_options.fedavg_lora_ft.steps=9",
     "fine-tunes for 9 steps after each download, more than the 8 local steps"),
    ("run --methods fedavg_lora --set adapter.kind=tri", "adapter.kind='tri' conflicts with federation.method='fedavg_lora'"),
    ("run --methods local --set adapter.core_only=True", "adapter.core_only trains only the cores"),
    ("run --set aggregation.personalized=False", "is the method celora_avg"),
    ("run --set federation.round=3", "unknown config key 'federation.round'"),
    ("run --set federation.rounds=many", "expects int"),
    ("run --set federation.rounds=-1", "federation.rounds must be at least 1"),
    ("run --set federation.rounds", "not of the form key=value"),
    ("run --set federation=3", "names a section"),
    ("run --set adapter.rank=0", "adapter rank must be a positive integer"),
    ("run --set adapter.rank=1000 --set model.path={model}", "adapter rank 1000 exceeds min(d_in, d_out) = 32"),
    ("run --set adapter.target=decoder --set model.path={model}", "matches no 2-D kernel"),
    ("run --set adapter.target=( ", "not a valid regex"),
    ("run --set partition.alpha=0", "alpha must be > 0"),
    ("run --set partition.num_clients=5000", "examples, the data has 33530"),
    ("run --set federation.participation=1.5", "participation must be in (0, 1]"),
    ("run --set federation.client_dropout=1", "client_dropout must be in [0, 1)"),
    ("run --set model.dtype=int8", "model.dtype must be one of"),
    ("run --set model.attention=flash", "model.attention must be one of ['einsum', 'xla', 'cudnn']"),
    ("run --set model.attention=cudnn", "cuDNN's fused attention runs in half precision"),
    ("run --set model.path={tmp}/nowhere", "does not exist"),
    ("run --set model.path={no_weights}", "has no *.safetensors file"),
    ("run --set model.path={small_vocab}", "tokenizer and model do not match"),
    ("run --set data.path={tmp}/missing.csv", "does not exist"),
    ("run --set data.path={tmp}/notes.txt", "supported extensions are"),
    ("run --set data.path={tmp}/columns.csv", "has no column(s) ['text', 'label']"),
    ("run --set data.path={tmp}/binary.csv", "cannot read"),
    ("run --set checkpoint.keep=0", "checkpoint.keep >= 1"),
    ("run --set model.max_length=100000", "model.max_length=100000 exceeds the 512 positions of the encoder"),
    ("run --set model.path={tmp}/notes.txt", "is a file; an encoder needs a local HF model directory"),
    ("run --set data.path={tmp}", "is a directory; give one CSV/TSV/JSON(L)/parquet file"),
    ("run --set data.path={tmp}/one_class.csv", "holds a single class ('1'); classification needs at least two"),
    ("run --set data.path={tmp}/empty.csv", "is empty"),
    ("run --set data.path={tmp}/two_classes.csv --set partition.scheme='source' --set data.group_column='domain'",
     "partition.scheme='source' splits clients by data.group_column, but the data has no column 'domain'"),
    ("run --set partition.scheme=clustered_labels --set partition.num_clusters=3",
     "num_clusters=3 exceeds the 2 classes"),
    ("run --set partition.scheme=clustered_domains --set partition.num_clusters=11",
     "num_clusters=11 exceeds the 10 clients"),
    ("run --set partition.scheme=clustered_domains --set partition.num_clusters=3",
     "num_clusters=3 exceeds the 2 sources/groups"),
    ("run --set partition.scheme=natural --set partition.num_clients=1 --set partition.train_examples=30000",
     "none of the 2 groups has that many"),
    ("run --set partition.scheme=natural --set data.group_column=role",
     "partition.scheme='natural' splits clients by data.group_column, but the data has no column 'role'"),
    ("run --set data.corpus=imagenet", "unknown data.corpus 'imagenet'"),
    ("run --set optimizer.core_lr_multiplier=0", "core_lr_multiplier must be > 0"),
    ("run --set aggregation.data_distance=joint", "data_distance must be one of"),
    ("run --set seed=-1", "seed must be an integer >= 0, got -1"),
    ("run --set optimizer.learning_rate=1e999", "optimizer.learning_rate must be a finite number, got inf"),
    ("run --output-dir {tmp}/notes.txt/runs", "cannot create the output directory"),
    ("run --resume {tmp}/nowhere", "no config.json"),
    ("run --resume {empty_run}", "no checkpoint to resume from"),
    ("run --resume {corrupt}", "is unreadable or truncated"),
    ("run --resume {truncated}", "is unreadable or truncated"),
    ("run --resume {good} --set adapter.rank=4", "written by an incompatible config"),
    ("run --preset smoke --set name=tiny --set model.path={model} --output-dir {good_root}",
     "already holds checkpoints"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[c[0].split(" --set ")[-1][:40] for c in CASES])
def test_bad_input_gives_one_line_error_and_nonzero_exit(argv, message, bad_dirs, capsys):
    good = bad_dirs["good"]
    before = _tree_digest(good)
    values = {k: str(v) for k, v in bad_dirs.items()}
    values["good_root"] = str(good.parent.parent)
    args = argv.format(**values).split()
    assert cli.main(args + ["--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert _tree_digest(good) == before  # the good run and its checkpoints are untouched


def test_cli_resume_of_a_finished_run_reports_without_training(good_run, capsys):
    before = _tree_digest(good_run / "checkpoints")
    assert cli.main(["run", "--resume", str(good_run), "--no-progress"]) == 0
    assert "| celora |" in capsys.readouterr().out
    assert _tree_digest(good_run / "checkpoints") == before


def test_an_internal_error_prints_its_traceback_and_a_one_line_summary(monkeypatch, capsys, tmp_path):
    from celora_jax.federated import engine

    def broken(*args, **kwargs):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(engine, "run", broken)
    assert cli.main(["run", "--preset", "smoke", "--no-progress", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and any("an invariant broke" in line for line in err[:-1])
    assert err[-1].startswith("celora-jax: internal error: RuntimeError: an invariant broke")
    assert "please report it" in err[-1]
