"""The privacy-attack and DP studies of experiments/ in their --smoke form (a file of its own so
that pytest-xdist can run it beside the other experiment tests), on a tiny BERT: the studies'
bookkeeping is under test here; the real MiniLM end to end is tests/test_cli.py's."""

import pytest


@pytest.mark.assets
@pytest.mark.slow
def test_privacy_study_smoke_writes_table_and_plot(tmp_path, tiny_model_dir, movie_reviews_csv):
    import json

    from experiments import privacy

    assert privacy.main(["--smoke", "--output-dir", str(tmp_path), "--model-dir", str(tiny_model_dir)]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["setting"] for r in records} == set(privacy.SETTINGS)
    by_setting = {r["setting"]: r for r in records}
    # The observed numbers are what each setting uploads: cores are r^2 per adapted matrix
    # (2 layers x 6 linears), LoRA r (d_in + d_out) (width 32, MLP 64, rank 8).
    assert by_setting["celora_known_ab"]["observed_numbers"] == 12 * 8 * 8
    assert by_setting["fedavg_lora"]["observed_numbers"] == 2 * (4 * 8 * (32 + 32) + 2 * 8 * (32 + 64))
    for record in records:
        assert 0.0 <= record["token_recovery"] <= 1.0 and 0.0 <= record["token_accuracy"] <= 1.0
    table = (tmp_path / "results.md").read_text()
    assert "| celora_unknown_ab | 1 |" in table
    assert (tmp_path / "recovery.png").stat().st_size > 0


def test_privacy_study_with_a_missing_model_dir_is_a_usage_error(tmp_path, capsys):
    from experiments import privacy

    with pytest.raises(SystemExit) as exit_info:
        privacy.main(["--smoke", "--output-dir", str(tmp_path), "--model-dir", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--model-dir: model directory" in error and "does not exist" in error
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.assets
@pytest.mark.slow
def test_dp_study_smoke_writes_table_and_plot_and_resumes(tmp_path, tiny_model_dir, movie_reviews_csv, capsys):
    import json

    from experiments import dp as dp_study

    args = ["--smoke", "--out", str(tmp_path), "--set", f"model.path={tiny_model_dir}"]
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
