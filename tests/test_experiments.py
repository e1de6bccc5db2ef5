"""Study grid (resumable) and report on CI-sized smoke runs of the real data. The runs use a
tiny BERT (``--set model.path=...``): what these tests check is the grid's bookkeeping, and
the real MiniLM end to end is tests/test_cli.py's job."""

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


def test_smoke_grid_resumes_and_reports(tmp_path, tiny_model_dir, movie_reviews_csv, capsys, monkeypatch):
    import json

    tiny = ["--set", f"model.path={tiny_model_dir}"]
    args = ["--study", "ablation_beta", "--smoke", "--seeds", "0", "--out", str(tmp_path / "raw"), *tiny]
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
    assert grid.main(["--study", "ablation_lambda", "--smoke", "--seeds", "0", "--out", str(tmp_path / "raw"),
                      *tiny]) == 0
    assert sorted(computed) == [0.1, 0.3, 3.0, 10.0]
    raw = tmp_path / "raw"
    copied, source = raw / "ablation_lambda/lambda1.0/seed0", raw / "ablation_beta/beta0.5/seed0"
    assert (copied / "metrics.jsonl").read_text() == (source / "metrics.jsonl").read_text()
    assert json.loads((copied / "summary.json").read_text())["same_config_as"] == "ablation_beta/beta0.5/seed0"
    assert grid.finished_twin(raw, grid.grid("ablation_lambda", [1], True, tiny[1:])[2][1]) is None  # other seed


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
    table = (root / "table.md").read_text()
    assert table.count("| cluster_oracle |") == 1
    # The overview: every method on every setting, accuracy (paired difference to local ± SE).
    assert (f"| `cluster_oracle` | {100 * oracle['mean']:.1f} ({100 * oracle['diff_vs_local']:+.1f} ± "
            f"{100 * oracle['se_vs_local']:.1f}) |") in table and "| `local` | " in table
    assert (root / "movie_reviews_clustered_domains_accuracy.png").stat().st_size > 0
    assert benchmarks.worst_fraction(np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4, 1.0, 0.0])) == 0.0


def test_benchmark_smoke_runs_a_gate_end_to_end(tmp_path, tiny_model_dir, wordnet_nouns, capsys):
    """WordNet with relabelled clusters, CI-sized: the runs resume and the report has the
    summary.json shape of issue #21."""
    from experiments import benchmarks

    args = ["--stage", "gates", "--smoke", "--settings", "wordnet_clustered_labels", "--seeds", "0",
            "--out", str(tmp_path), "--set", f"model.path={tiny_model_dir}"]
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
    # The centralized reference: FedAvg-LoRA on the pooled training data, in its own row.
    assert benchmarks.main([*args[:1], "grid", *args[2:], "--methods", "centralized"]) == 0
    config = json.loads((tmp_path / "wordnet_clustered_labels/centralized/seed0/config.json").read_text())
    assert config["federation"]["method"] == "fedavg_lora" and config["partition"]["pooled_training"] is True
    summary = json.loads((tmp_path / "summary.json").read_text())
    centralized = summary["settings"]["wordnet_clustered_labels"]["methods"]["centralized"]
    assert centralized["seeds"] == 1 and 0.0 <= centralized["mean"] <= 1.0
    assert benchmarks.main(["--stage", "gates", "--settings", "imagenet"]) == 2
