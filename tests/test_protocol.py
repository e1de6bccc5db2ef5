"""The benchmark protocol (experiments/protocol.py): the selection rule on recorded runs,
the frontier, and one arm end to end on CI-sized runs."""

import gzip
import json

import jax
import numpy as np
import pytest

from experiments import protocol


def _fake_run(root, run_id, validation, loss=1.0, test=0.5, mb=1.0, curve=None, clients=None):
    """A finished run as engine.run writes it, with what the protocol reads."""
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    curve = curve or [validation]
    records = [{"round": i + 1, "validation_accuracy_mean": v, "validation_loss": loss,
                "test_accuracy_mean": test, "client_test_accuracy": clients or [test, test]} for i, v in enumerate(curve)]
    records[-1]["validation_accuracy_mean"] = validation
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"mb_per_round": mb, "num_clients": 2, "seconds": 60.0 * test,
                                                      "sent_params_per_client": 10, "validation": validation}))
    (run_dir / "config.json").write_text("{}")


def _fake_stages(root, where, beta, lam):
    """Seed 0 of the rate grid (3e-3 wins, in the middle) and of the β and λ stages at 3e-3,
    where ``beta`` and then ``lam`` win."""
    for rate, validation in zip(protocol.LEARNING_RATES, (0.4, 0.6, 0.5)):
        _fake_run(root, f"{where}/lr{rate:g}/seed0", validation)
    for name, _ in protocol.BETA_GRID:
        _fake_run(root, f"{where}/lr0.003_{name}/seed0", 0.7 if name == f"beta{beta}" else 0.6)
    for name, _ in protocol.LAMBDA_GRID:
        _fake_run(root, f"{where}/lr0.003_beta{beta}_{name}/seed0", 0.8 if name == f"lam{lam}" else 0.6)


def _next(root, arm, smoke=False):
    return [run_id for run_id, _ in protocol.plan(root, "trec_fewshot_iid", protocol.ARMS[arm], smoke)]


def test_the_rule_tunes_the_rate_then_extends_an_edge_then_the_server_then_seeds(tmp_path):
    arm = "celora"
    where = f"trec_fewshot_iid/{arm}"
    assert _next(tmp_path, arm) == [f"{where}/lr{r:g}/seed0" for r in protocol.LEARNING_RATES]
    for rate, validation in zip(protocol.LEARNING_RATES, (0.4, 0.5, 0.6)):
        _fake_run(tmp_path, f"{where}/lr{rate:g}/seed0", validation)
    assert _next(tmp_path, arm) == [f"{where}/lr0.03/seed0"]  # the best is the highest rate: one step beyond
    _fake_run(tmp_path, f"{where}/lr0.03/seed0", 0.55)
    # The server's stages at the chosen rate: β first, then λ at the chosen β.
    assert _next(tmp_path, arm) == [f"{where}/lr0.01_{name}/seed0" for name, _ in protocol.BETA_GRID]
    for (name, _), validation in zip(protocol.BETA_GRID, (0.65, 0.6, 0.5)):
        _fake_run(tmp_path, f"{where}/lr0.01_{name}/seed0", validation)
    assert _next(tmp_path, arm) == [f"{where}/lr0.01_beta0.0_{name}/seed0" for name, _ in protocol.LAMBDA_GRID]
    assert [config.aggregation.beta for _, config in protocol.plan(
        tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], False)] == [0.0, 0.0, 0.0]  # the choice so far is kept
    for (name, _), validation in zip(protocol.LAMBDA_GRID, (0.6, 0.7, 0.7)):
        # lam1.0 and lam10.0 tie on accuracy; the lower validation loss wins.
        _fake_run(tmp_path, f"{where}/lr0.01_beta0.0_{name}/seed0", validation, loss=0.5 if name == "lam10.0" else 0.9)
    # What the parameter distance measures from: the λ stage's run is the first option.
    todo = list(protocol.plan(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], False))
    assert [run_id for run_id, _ in todo] == [f"{where}/lr0.01_beta0.0_lam10.0_since_received/seed0"]
    assert [(c.aggregation.beta, c.aggregation.lam, c.aggregation.update_since) for _, c in todo] == [
        (0.0, 10.0, "received")]
    # A tie (accuracy and loss): the option already chosen stays.
    _fake_run(tmp_path, f"{where}/lr0.01_beta0.0_lam10.0_since_received/seed0", 0.7, loss=0.5)
    # The rate once more, at the chosen server settings: the grid's other rates.
    todo = list(protocol.plan(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], False))
    assert [run_id for run_id, _ in todo] == [f"{where}/lr{r}_beta0.0_lam10.0/seed0" for r in ("0.001", "0.003")]
    assert [(c.optimizer.learning_rate, c.aggregation.beta, c.aggregation.lam) for _, c in todo] == [
        (0.001, 0.0, 10.0), (0.003, 0.0, 10.0)]
    assert protocol.choice(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], smoke=False) is None
    _fake_run(tmp_path, f"{where}/lr0.001_beta0.0_lam10.0/seed0", 0.5)
    _fake_run(tmp_path, f"{where}/lr0.003_beta0.0_lam10.0/seed0", 0.75)  # the rate moved with the settings
    chosen_step = f"{where}/lr0.003_beta0.0_lam10.0"
    todo = list(protocol.plan(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], False))
    assert [run_id for run_id, _ in todo] == [f"{chosen_step}/seed1", f"{chosen_step}/seed2"]
    assert {(c.optimizer.learning_rate, c.aggregation.beta, c.aggregation.lam) for _, c in todo} == {(0.003, 0.0, 10.0)}
    _fake_run(tmp_path, f"{chosen_step}/seed1", 0.7, test=0.6)
    _fake_run(tmp_path, f"{chosen_step}/seed2", 0.7, test=0.7)
    assert _next(tmp_path, arm) == []
    chosen = protocol.choice(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], smoke=False)
    assert chosen["learning_rate"] == 0.003 and chosen["server"] == ["aggregation.beta=0.0", "aggregation.lam=10.0"]
    assert chosen["step"] == "lr0.003_beta0.0_lam10.0" and chosen["first_rate"] == 0.01
    assert chosen["validation_by_server"] == {"beta0.0": 0.65, "beta0.5": 0.6, "beta1.0": 0.5, "beta0.0_lam0.1": 0.6,
                                              "beta0.0_lam1.0": 0.7, "beta0.0_lam10.0": 0.7,
                                              "beta0.0_lam10.0_since_received": 0.7}
    assert chosen["validation_by_rate"] == {"0.001": 0.4, "0.003": 0.5, "0.01": 0.6, "0.03": 0.55}
    assert chosen["validation_by_rate_at_server"] == {"0.001": 0.5, "0.003": 0.75, "0.01": 0.7}
    assert not chosen["at_grid_edge"]
    for rate, validation in zip((*protocol.LEARNING_RATES, 0.03), (0.4, 0.5, 0.6, 0.65)):  # the extension wins
        _fake_run(tmp_path / "edge", f"trec_fewshot_iid/local/lr{rate:g}/seed0", validation)
    edge = protocol.choice(tmp_path / "edge", "trec_fewshot_iid", protocol.ARMS["local"], smoke=False)
    assert edge["learning_rate"] == 0.03 and edge["at_grid_edge"]  # nothing beyond it is tried: the report says so
    row = protocol.summarize(tmp_path, ["trec_fewshot_iid"], smoke=False)["settings"]["trec_fewshot_iid"]["arms"][arm]
    assert row["seeds"] == [0, 1, 2] and row["test_accuracy"] == pytest.approx(0.6)
    assert row["test_accuracy_se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert row["test_accuracy_by_seed"] == pytest.approx({"0": 0.5, "1": 0.6, "2": 0.7})


def test_the_second_pass_over_rates_extends_an_edge_at_the_server_settings(tmp_path):
    where = "trec_fewshot_iid/celora"
    _fake_stages(tmp_path, where, "0.5", "0.1")
    _fake_run(tmp_path, f"{where}/lr0.003_beta0.5_lam0.1_since_received/seed0", 0.82)  # the distance's origin moves
    suffix = "beta0.5_lam0.1_since_received"
    assert _next(tmp_path, "celora") == [f"{where}/lr{r}_{suffix}/seed0" for r in ("0.001", "0.01")]
    _fake_run(tmp_path, f"{where}/lr0.001_{suffix}/seed0", 0.85)  # now the lowest rate wins: one step below
    _fake_run(tmp_path, f"{where}/lr0.01_{suffix}/seed0", 0.5)
    _fake_run(tmp_path, f"{where}/lr0.003_{suffix}_2x_rounds/seed0", 0.99)  # a plateau check is no candidate
    assert _next(tmp_path, "celora") == [f"{where}/lr0.0003_{suffix}/seed0"]
    _fake_run(tmp_path, f"{where}/lr0.0003_{suffix}/seed0", 0.8)
    todo = list(protocol.plan(tmp_path, "trec_fewshot_iid", protocol.ARMS["celora"], False))
    assert [run_id for run_id, _ in todo] == [f"{where}/lr0.001_{suffix}/seed{k}" for k in (1, 2)]
    assert {(c.aggregation.lam, c.aggregation.update_since) for _, c in todo} == {(0.1, "received")}
    chosen = protocol.choice(tmp_path, "trec_fewshot_iid", protocol.ARMS["celora"], smoke=False)
    assert chosen["server"] == ["aggregation.beta=0.5", "aggregation.lam=0.1", "aggregation.update_since='received'"]
    assert chosen["validation_by_rate_at_server"] == {"0.0003": 0.8, "0.001": 0.85, "0.003": 0.82, "0.01": 0.5}
    assert chosen["validation_by_rate"] == {"0.001": 0.4, "0.003": 0.6, "0.01": 0.5}  # the first pass, unchanged
    # With β = 1 the parameter distance has no weight: where it measures from is not tried.
    moot = "trec_fewshot_iid/celora_weight_svd_r16"
    _fake_stages(tmp_path, moot, "1.0", "1.0")
    assert _next(tmp_path, "celora_weight_svd_r16") == [f"{moot}/lr{r}_beta1.0_lam1.0/seed0" for r in ("0.001", "0.01")]
    # Arms without server settings choose their rate once.
    for rate, validation in zip(protocol.LEARNING_RATES, (0.4, 0.6, 0.5)):
        _fake_run(tmp_path, f"trec_fewshot_iid/local/lr{rate:g}/seed0", validation)
    local = protocol.choice(tmp_path, "trec_fewshot_iid", protocol.ARMS["local"], smoke=False)
    assert local["step"] == "lr0.003" and local["validation_by_rate_at_server"] == {}


def test_higher_ranks_take_the_first_ranks_server_settings_and_choose_only_the_rate(tmp_path):
    """Rule 3a: CE-LoRA at r = 32 in a basis waits for r = 16's server choice in that basis on
    the same setting, then runs the rate grid at it (no server stages of its own)."""
    donor, arm = "celora_weight_svd_r16", "celora_weight_svd_r32"
    assert protocol.ARMS[arm].server_from == donor and not protocol.ARMS[arm].server_stages
    assert protocol.ARMS["celora_gradient_svd_r64"].server_from == "celora_gradient_svd_r16"
    assert protocol.ARMS[donor].server_from is None and protocol.ARMS["celora"].server_from is None
    assert _next(tmp_path, arm) == [] and protocol.choice(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], False) is None
    assert protocol.waiting(tmp_path, ["trec_fewshot_iid"], [arm], False) == [
        f"trec_fewshot_iid/{arm} waits for {donor}'s server settings (rule 3a); add that arm to --arms"]
    where = f"trec_fewshot_iid/{donor}"
    _fake_stages(tmp_path, where, "0.5", "0.1")
    _fake_run(tmp_path, f"{where}/lr0.003_beta0.5_lam0.1_since_received/seed0", 0.7)
    assert _next(tmp_path, arm) == []  # the donor's second rate pass is still to run
    for rate in (0.001, 0.01):
        _fake_run(tmp_path, f"{where}/lr{rate:g}_beta0.5_lam0.1/seed0", 0.75 if rate == 0.01 else 0.5)
    assert protocol.waiting(tmp_path, ["trec_fewshot_iid"], [donor, arm], False) == []
    suffix = "beta0.5_lam0.1"
    todo = list(protocol.plan(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], False))
    assert [run_id for run_id, _ in todo] == [f"trec_fewshot_iid/{arm}/lr{r:g}_{suffix}/seed0"
                                              for r in protocol.LEARNING_RATES]
    assert {(c.adapter.rank, c.aggregation.beta, c.aggregation.lam, c.aggregation.update_since)
            for _, c in todo} == {(32, 0.5, 0.1, "start")}
    for rate, validation in zip(protocol.LEARNING_RATES, (0.5, 0.8, 0.7)):  # its own rate, not the donor's
        _fake_run(tmp_path, f"trec_fewshot_iid/{arm}/lr{rate:g}_{suffix}/seed0", validation)
    todo = list(protocol.plan(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], False))
    assert [run_id for run_id, _ in todo] == [f"trec_fewshot_iid/{arm}/lr0.003_{suffix}/seed{k}" for k in (1, 2)]
    assert {(c.optimizer.learning_rate, c.aggregation.lam) for _, c in todo} == {(0.003, 0.1)}
    chosen = protocol.choice(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], False)
    assert chosen["server"] == ["aggregation.beta=0.5", "aggregation.lam=0.1"] and chosen["server_from"] == donor
    assert chosen["validation_by_rate"] == {"0.001": 0.5, "0.003": 0.8, "0.01": 0.7}
    assert chosen["validation_by_server"] == {} and chosen["step"] == f"lr0.003_{suffix}"


def test_rule_3a_is_checked_where_it_met_the_target_by_an_arm_searching_its_own_server(tmp_path):
    """The check searches the server settings at r = 32 itself, on WordNet only, judged by
    no target or claim; runs identical to the checked arm's are copied from it, not rerun."""
    checked, check = "celora_weight_svd_r32", "celora_weight_svd_r32_own_server"
    arm = protocol.ARMS[check]
    assert arm.checks == checked and arm.server_stages == protocol.CELORA_SERVER and arm.server_from is None
    assert arm.overrides == protocol.ARMS[checked].overrides
    assert [s for s in protocol.DEFAULT_SETTINGS if protocol.applies(arm, s)] == ["wordnet_clustered_labels"]
    assert check not in protocol.TARGET_CANDIDATES and check not in dict(protocol.CE_LORA_TWINS)
    order = protocol.ordered_arms(None)
    assert order.index(check) == order.index("cluster_oracle_weight_svd_r32") + 1
    todo = list(protocol.plan(tmp_path, "wordnet_clustered_labels", arm, False))
    assert [run_id.split("/", 2)[2] for run_id, _ in todo] == [f"lr{r:g}/seed0" for r in protocol.LEARNING_RATES]
    assert {(c.adapter.rank, c.adapter.init, c.federation.method) for _, c in todo} == {(32, "weight_svd", "celora")}
    # A finished run of the checked arm with the same configuration is this arm's twin.
    run_id, config = todo[0]
    out = tmp_path / run_id
    twin = tmp_path / "wordnet_clustered_labels" / checked / out.parent.name / "seed0"
    _fake_run(tmp_path, twin.relative_to(tmp_path).as_posix(), 0.5)
    (twin / "config.json").write_text(json.dumps(protocol.to_dict(config)))
    assert protocol._finished_twin(out, config) == twin
    other = protocol.apply_overrides(config, ["aggregation.lam=10.0"])
    assert protocol._finished_twin(out, other) is None
    assert protocol._run(tmp_path, run_id, config) == 0 and (out / "summary.json").exists()
    # Neither the check nor a reference is a point of the frontier.
    rows = {name: {"mb_per_round": 9.1, "test_accuracy": 0.65} for name in (checked, check, "cluster_oracle")}
    assert protocol.frontier_points(rows) == {checked: (9.1, 0.65)}


def test_status_counts_measured_arms_and_estimates_the_rest(tmp_path):
    where = "trec_fewshot_iid/local"
    for rate, validation in zip(protocol.LEARNING_RATES, (0.4, 0.6, 0.5)):
        _fake_run(tmp_path, f"{where}/lr{rate:g}/seed0", validation, test=0.5)
    for seed in (1, 2):
        _fake_run(tmp_path, f"{where}/lr0.003/seed{seed}", 0.6, test=0.5 + seed / 10)
    _fake_run(tmp_path, "trec_fewshot_iid/celora/lr0.001/seed0", 0.5, test=0.5)
    [line] = protocol.status(tmp_path, ["trec_fewshot_iid"], ["local", "celora"], smoke=False)
    # 6 runs of 30-42 s (median 30 s); local took 5; celora (server settings: 13 assumed) ran 1.
    assert line == ("trec_fewshot_iid: 1 of 2 arms measured; 6 runs finished (0.1 h, median 0.5 min per run); "
                    "next: celora (2 runs ready); left: about 1 arms, ~12 runs (an arm takes 5.0 without server "
                    "settings, 13.0 with them [assumed]), ~0.1 h at this pace, plateau checks besides.")
    _fake_run(tmp_path, "trec_fewshot_iid/local/lr0.003_2x_rounds/seed0", 0.6, test=5.0)  # a plateau check
    [line] = protocol.status(tmp_path, ["trec_fewshot_iid"], ["local", "celora"], smoke=False)
    assert "median 0.5 min per run" in line and "5.0 without server settings" in line


def test_status_paces_a_setting_not_yet_run_by_the_earlier_grid_scaled_as_on_the_settings_both_ran(tmp_path):
    """WordNet has run (local: 5 runs of 30-31 s, median 30 s); the earlier grid ran both
    settings at 10 rounds, 1 s a round on WordNet and 3 s on reviews. The protocol's 20 rounds
    took 30 s on WordNet, 1.5x the earlier pace there, so reviews are paced at 3 x 20 x 1.5 s
    = 1.5 min per run, with WordNet's 5 runs per arm without server settings."""
    root, earlier = tmp_path / "protocol", tmp_path / "earlier"
    where = "wordnet_clustered_labels/local"
    for rate, validation in zip(protocol.LEARNING_RATES, (0.4, 0.6, 0.5)):
        _fake_run(root, f"{where}/lr{rate:g}/seed0", validation, test=0.5)
    for seed in (1, 2):
        _fake_run(root, f"{where}/lr0.003/seed{seed}", 0.6, test=0.5 + seed / 100)
    for setting, seconds in (("wordnet_clustered_labels", 10.0), ("movie_reviews_clustered_domains", 30.0)):
        for seed in (0, 1, 2):
            run = earlier / setting / "local" / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"seconds": seconds, "rounds": 10}))
    settings = ["wordnet_clustered_labels", "movie_reviews_clustered_domains"]
    wordnet, reviews, total = protocol.status(root, settings, ["local"], smoke=False, earlier=earlier)
    assert "1 of 1 arms measured" in wordnet and "left" not in wordnet
    assert reviews == ("movie_reviews_clustered_domains: 0 of 1 arms measured; 0 runs finished (0.0 h); next: local "
                       "(3 runs ready); left: about 1 arms, ~5 runs (an arm takes 5.0 without server settings "
                       "[as on the other settings], 13.0 with them [assumed]), ~0.1 h at an estimated 1.5 min "
                       "per run (the 1e-3 grid's pace here, x1.50 as on the settings both grids ran), plateau checks "
                       "besides.")
    assert total == "in all: ~0.1 h of runs left on the settings estimated above."
    # Where only one basis is asked for, the other basis's arms run last: their hours are told apart.
    _, reviews, total = protocol.status(root, settings, ["local", "fed_sb_gradient_svd_r16"], smoke=False,
                                        earlier=earlier)
    assert "left: about 2 arms, ~10 runs" in reviews and (
        "~0.2 h at an estimated 1.5 min per run" in reviews) and (
        "of which ~0.1 h for the 1 gradient_svd arms, which run last here" in reviews)


def test_a_middle_winner_needs_no_extension_and_runs_carry_the_chosen_settings(tmp_path):
    arm = "fed_sb_weight_svd_r32"
    where = f"trec_fewshot_iid/{arm}"
    for rate, validation in zip(protocol.LEARNING_RATES, (0.4, 0.8, 0.6)):
        _fake_run(tmp_path, f"{where}/lr{rate:g}/seed0", validation)
    todo = list(protocol.plan(tmp_path, "trec_fewshot_iid", protocol.ARMS[arm], smoke=False))
    assert [run_id for run_id, _ in todo] == [f"{where}/lr0.003/seed1", f"{where}/lr0.003/seed2"]
    config = todo[0][1]
    assert (config.federation.method, config.adapter.init, config.adapter.rank) == ("fed_sb", "weight_svd", 32)
    assert (config.optimizer.learning_rate, config.seed, config.partition.seed) == (0.003, 1, 1)
    assert config.federation.rounds == protocol.ROUNDS and config.partition.validation_fraction == 0.2
    assert config.federation.test_every == protocol.ROUNDS  # the test split is read once, at the end
    # The preset's 16 training examples per client stay 16: 4 more are drawn for validation.
    assert (config.partition.train_examples, config.partition.validation_examples) == (20, 4)


def test_arms_are_compared_paired_and_the_gate_is_rechecked_at_the_chosen_rates(tmp_path):
    """Each arm against local training and FedAvg-LoRA r=8, paired over (client, seed) at
    each one's chosen rate; the setting's gate (FedAvg-LoRA > local by > 3 SE on TREC) from
    the same pairs, undecided below three seeds."""
    gaps = {0: [0.30, 0.32], 1: [0.28, 0.31], 2: [0.29, 0.33]}
    for arm, rate in (("local", 0.003), ("fedavg_lora_r8", 0.003)):  # middle winners: no extension
        where = f"trec_fewshot_iid/{arm}"
        for other in protocol.LEARNING_RATES:  # the chosen rate wins on validation
            _fake_run(tmp_path, f"{where}/lr{other:g}/seed0", 0.9 if other == rate else 0.1,
                      clients=[0.5 + (arm != "local") * g for g in gaps[0]])
        for seed in (1, 2):
            _fake_run(tmp_path, f"{where}/lr{rate:g}/seed{seed}", 0.9,
                      clients=[0.5 + (arm != "local") * g for g in gaps[seed]])
    data = protocol.summarize(tmp_path, ["trec_fewshot_iid"], smoke=False)["settings"]["trec_fewshot_iid"]
    compared = data["arms"]["fedavg_lora_r8"]["paired"]["local"]
    differences = [g for seed in gaps.values() for g in seed]
    assert compared["seeds"] == 3 and compared["diff"] == pytest.approx(sum(differences) / 6)
    assert data["arms"]["local"]["paired"]["fedavg_lora_r8"]["diff"] == pytest.approx(-compared["diff"])
    assert data["gate"]["passed"] and not data["gate"]["pilot"]
    assert "passes" in protocol.gate_line(data["gate"]) and "+30.5 ± 0.8 [3]" in protocol.markdown(
        {"rule": protocol.summarize(tmp_path, [], smoke=False)["rule"], "settings": {"trec_fewshot_iid": data}})
    for run in tmp_path.rglob("seed2"):  # two seeds: a pilot, not a verdict
        for f in run.iterdir():
            f.unlink()
        run.rmdir()
    gate = protocol.summarize(tmp_path, ["trec_fewshot_iid"], smoke=False)["settings"]["trec_fewshot_iid"]["gate"]
    assert gate["pilot"] and not gate["passed"] and "not yet measured" in protocol.gate_line(gate)


def test_every_arm_is_paired_with_the_strongest_federated_baseline_on_three_seeds(tmp_path):
    """The strongest federated baseline is the one with the best mean own-test accuracy on
    every seed: an arm on fewer seeds, or a reference (the cluster oracle), never is."""
    accuracy = {"local": 0.5, "fedavg_lora_r8": 0.7, "ffa_lora": 0.8, "fedprox": 0.95, "cluster_oracle": 0.9}
    for arm, test in accuracy.items():
        where = f"wordnet_clustered_labels/{arm}"
        for rate in protocol.LEARNING_RATES:  # 3e-3 wins on validation: no extension
            _fake_run(tmp_path, f"{where}/lr{rate:g}/seed0", 0.9 if rate == 0.003 else 0.1, test=test,
                      clients=[test, test + 0.02])
        for seed in (1, 2) if arm != "fedprox" else (1,):  # FedProx: two seeds, not yet a baseline
            _fake_run(tmp_path, f"{where}/lr0.003/seed{seed}", 0.9, test=test + 0.01 * seed,
                      clients=[test + 0.01 * seed, test + 0.02])
    data = protocol.summarize(tmp_path, ["wordnet_clustered_labels"], smoke=False)["settings"][
        "wordnet_clustered_labels"]
    assert data["strongest_federated_baseline"] == "ffa_lora"
    arms = data["arms"]
    assert arms["fedavg_lora_r8"]["paired"]["ffa_lora"]["diff"] == pytest.approx(-0.1)
    assert arms["fedprox"]["paired"]["ffa_lora"]["seeds"] == 2
    assert "ffa_lora" not in arms["ffa_lora"]["paired"]
    table = protocol.markdown({"rule": protocol.summarize(tmp_path, [], smoke=False)["rule"],
                               "settings": {"wordnet_clustered_labels": data}})
    assert "Strongest federated baseline (best mean own-test accuracy on three seeds" in table
    assert "| local | 3 | 51.5 ± 0.3 | - | -20.0 ± 0.0 [3] | -30.0 ± 0.0 [3] |" in table
    assert protocol.strongest_baseline({}) is None


def test_the_target_is_met_missed_or_undecided():
    def row(accuracy, mb, seeds=3, paired=None):
        return {"test_accuracy": accuracy, "mb_per_round": mb, "seeds": list(range(seeds)), "paired": paired or {}}

    whole = {"fedavg_lora_r4": row(0.88, 40), "fedavg_lora_r8": row(0.90, 80), "fedavg_lora_r16": row(0.89, 160),
             "fedex_lora": row(0.895, 1200)}
    rows = {**whole, "celora_weight_svd_r32": row(0.893, 5.0), "celora_weight_svd_r64": row(0.85, 20.0)}
    target = protocol.target_check("trec_fewshot_iid", rows, frontier=["celora_weight_svd_r32", "fedavg_lora_r8"])
    assert target["decided"] and target["met_by"] == ["celora_weight_svd_r32"]  # 0.7 points, 16x fewer bytes
    # A basis exchanged once counts: 5 MB per round and 100 MB once over 20 rounds is 10 MB in all, 8x fewer.
    bought = {**whole, "celora_gradient_svd_r32": {**row(0.893, 5.0), "mb_basis_once": 100.0, "rounds": 20}}
    check = protocol.target_check("trec_fewshot_iid", bought, ["celora_gradient_svd_r32", "fedavg_lora_r8"])
    assert check["met_by"] == [] and check["checks"]["celora_gradient_svd_r32"]["times_fewer_bytes"] == pytest.approx(8)
    assert "at 8x fewer bytes" in protocol.target_line(check)
    missed = protocol.target_check("trec_fewshot_iid", {**whole, "celora_weight_svd_r64": row(0.85, 20.0)}, [])
    assert missed["met_by"] == [] and "MISSED" in protocol.target_line(missed) and "5.0 points below" in (
        protocol.target_line(missed))
    assert not protocol.target_check("trec_fewshot_iid", {**rows, "fedex_lora": row(0.9, 1200, seeds=2)},
                                     [])["decided"]
    # A candidate still on its first seeds waits; the others' verdicts stand meanwhile.
    running = protocol.target_check("trec_fewshot_iid", {**whole, "celora_weight_svd_r64": row(0.85, 20.0),
                                                         "celora_gradient_svd_r16": row(0.95, 5.0, seeds=1)}, [])
    assert running["decided"] and list(running["checks"]) == ["celora_weight_svd_r64"]
    assert running["pending"] == ["celora_gradient_svd_r16"]
    assert "5.0 points below" in protocol.target_line(running) and (
        "Still running: celora_gradient_svd_r16." in protocol.target_line(running))
    only_running = {**whole, "celora_gradient_svd_r16": row(0.95, 5.0, seeds=1)}
    waiting = protocol.target_check("trec_fewshot_iid", {**only_running, "fedex_lora": row(0.9, 1200, seeds=2)}, [])
    assert not waiting["decided"] and protocol.target_line(waiting).endswith(
        "undecided until fedex_lora, celora_gradient_svd_r16 have three seeds.")
    ahead = {"fedavg_lora_r8": {"diff": 0.20, "se": 0.01}, "local": {"diff": 0.02, "se": 0.01}}
    clustered = {"cluster_oracle": row(0.35, 50), "fedavg_lora_r8": row(0.15, 50), "local": row(0.31, 0),
                 "celora_gradient_svd_r16": row(0.345, 3.0, paired=ahead)}
    target = protocol.target_check("wordnet_clustered_labels", clustered, ["celora_gradient_svd_r16"])
    assert target["met_by"] == []  # within 0.5 point of the oracle, but only 2 SE ahead of local
    assert target["checks"]["celora_gradient_svd_r16"]["beats_fedavg_lora_and_local_by_3_se"] is False
    # The oracle is the yardstick: the line gives the difference to it paired over (client, seed).
    near = {**ahead, "local": {"diff": 0.05, "se": 0.01}, "cluster_oracle": {"diff": 0.01, "se": 0.007, "seeds": 3}}
    met = protocol.target_check("wordnet_clustered_labels",
                                {**clustered, "celora_weight_svd_r32": row(0.36, 9.0, paired=near)},
                                ["celora_weight_svd_r32"])
    assert met["met_by"] == ["celora_weight_svd_r32"] and protocol.target_line(met).startswith(
        "Target (CE-LoRA in a shared basis within 1 point of cluster_oracle")
    line = protocol.target_line(met)
    assert "met by celora_weight_svd_r32 (+1.0 ± 0.7 [3] against the oracle, paired)." in line
    assert line.endswith(" Missed by celora_gradient_svd_r16 0.5 points below the oracle, not ahead of both by "
                         "3 SE, not on the frontier.")  # the others' misses stand beside it


def test_frontier_and_plateau():
    points = {"a": (1.0, 0.5), "b": (2.0, 0.7), "c": (3.0, 0.6), "d": (0.5, 0.4), "e": (2.0, 0.65)}
    assert protocol.pareto(points) == ["d", "a", "b"]
    # Not communicating is a point too: at 0 bytes, it dominates every arm it beats.
    assert protocol.pareto({**points, "local": (0.0, 0.55)}) == ["local", "b"]
    # A basis exchanged once (gradient-SVD, round 0) is spread over the run's rounds: 4.67 MB per
    # round plus 174.2 MB once over 20 rounds costs 13.38 MB per round in all, more than 9.1.
    rows = {"celora_gradient_svd_r16": {"mb_per_round": 4.67, "mb_basis_once": 174.2, "rounds": 20,
                                        "test_accuracy": 0.633},
            "celora_weight_svd_r32": {"mb_per_round": 9.1, "mb_basis_once": 0.0, "rounds": 20, "test_accuracy": 0.655}}
    assert protocol.frontier_points(rows)["celora_gradient_svd_r16"] == pytest.approx((13.38, 0.633))
    assert protocol.pareto(protocol.frontier_points(rows)) == ["celora_weight_svd_r32"]
    assert protocol.still_rising([0.1] * 5 + [0.3] * 5) == pytest.approx(0.2)
    assert protocol.still_rising([0.1] * 9) is None
    assert protocol.still_rising([None, 0.1] * 5) == pytest.approx(0.0)  # evaluated every other round


def test_the_frontier_plot_names_every_arm_once_in_a_legend_best_first(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    # 30 arms, ten bytes values: three arms at each, as Fed-SB and CE-LoRA share one.
    arms = {f"arm{k}": {"mb_per_round": float(1 + k % 10), "test_accuracy": 0.3 + 0.01 * k, "test_accuracy_se": 0.01}
            for k in range(30)}
    arms["local"] = {"mb_per_round": 0.0, "test_accuracy": 0.5, "test_accuracy_se": 0.01}
    arms["cluster_oracle"] = {"mb_per_round": 56.0, "test_accuracy": 0.9, "test_accuracy_se": 0.01}
    frontier = protocol.pareto({name: (row["mb_per_round"], row["test_accuracy"]) for name, row in arms.items()
                                if name not in protocol.REFERENCES})  # as the report draws it
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    written = protocol.plot({"settings": {"s": {"arms": arms, "frontier": frontier}}}, tmp_path)
    assert [path.name for path in written] == ["s_frontier.png"] and written[0].stat().st_size > 0
    legend = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    named = [line.split(":")[0] for line in legend if ":" in line]
    assert sorted(named) == sorted(arms)  # every arm once, the reference and local as lines
    points = [name for name in named if name.startswith("arm")]
    assert points == sorted(points, key=lambda name: -arms[name]["test_accuracy"])  # best first
    assert {line.split(":")[0] for line in legend if line.endswith("(frontier)")} == {
        name for name in frontier if arms[name]["mb_per_round"] > 0}
    on_plot = {text.get_text() for text in figures[0].axes[0].texts}
    assert on_plot == {name for name in frontier if arms[name]["mb_per_round"] > 0}  # only the frontier is labelled
    # A label moved down beside a neighbour's is joined to its own point; one left in place is not.
    moved = {text.get_text(): text.arrow_patch is not None for text in figures[0].axes[0].texts}
    assert moved == {text.get_text(): text.xyann[1] < 3 for text in figures[0].axes[0].texts} and any(moved.values())


def test_the_plateau_check_reruns_seed_0_with_twice_the_rounds_for_the_arms_that_need_it(tmp_path):
    """Once measured, an arm named by the comparisons (FedAvg-LoRA r=8), on the frontier or
    still rising reruns seed 0 of its chosen configuration with twice the rounds; a flat arm
    off the frontier does not; the report states what the longer run gained."""
    flat, rising = [0.5] * 10, [0.3] * 5 + [0.5] * 5
    arms = {"fedavg_lora_r8": (0.9, 50.0, flat), "fedsa_lora": (0.6, 60.0, rising), "fedex_lora": (0.5, 70.0, flat)}
    for arm, (test, mb, curve) in arms.items():
        where = f"trec_fewshot_iid/{arm}"
        for rate in protocol.LEARNING_RATES:  # 3e-3 wins on validation
            _fake_run(tmp_path, f"{where}/lr{rate:g}/seed0", 0.5 if rate == 0.003 else 0.1, test=test, mb=mb,
                      curve=curve)
        for seed in (1, 2):
            _fake_run(tmp_path, f"{where}/lr0.003/seed{seed}", 0.5, test=test, mb=mb, curve=curve)
    data = protocol.summarize(tmp_path, ["trec_fewshot_iid"], smoke=False)["settings"]["trec_fewshot_iid"]
    assert data["frontier"] == ["fedavg_lora_r8"]
    assert protocol.plateau_candidates(data) == ["fedavg_lora_r8", "fedsa_lora"] == data["plateau_pending"]
    todo = list(protocol.plan_plateau(tmp_path, "trec_fewshot_iid", protocol.ARMS["fedsa_lora"],
                                      data["arms"]["fedsa_lora"], smoke=False))
    assert [run_id for run_id, _ in todo] == ["trec_fewshot_iid/fedsa_lora/lr0.003_2x_rounds/seed0"]
    config = todo[0][1]
    assert (config.federation.rounds, config.optimizer.learning_rate, config.seed) == (2 * protocol.ROUNDS, 0.003, 0)
    assert config.federation.test_every == 2 * protocol.ROUNDS
    assert config.federation.method == "fedsa_lora"
    _fake_run(tmp_path, todo[0][0], 0.58, test=0.65, mb=60.0, curve=rising * 2)
    _fake_run(tmp_path, "trec_fewshot_iid/fedavg_lora_r8/lr0.003_2x_rounds/seed0", 0.505, test=0.9, mb=50.0,
              curve=flat * 2)
    assert not list(protocol.plan_plateau(tmp_path, "trec_fewshot_iid", protocol.ARMS["fedsa_lora"],
                                          data["arms"]["fedsa_lora"], smoke=False))  # done: not again
    data = protocol.summarize(tmp_path, ["trec_fewshot_iid"], smoke=False)["settings"]["trec_fewshot_iid"]
    check = data["arms"]["fedsa_lora"]["plateau"]
    assert check["rounds"] == len(rising * 2) and check["under_trained"]  # the longer run's rounds
    assert check["validation_gain"] == pytest.approx(0.08) and check["test_gain"] == pytest.approx(0.05)
    assert not data["arms"]["fedavg_lora_r8"]["plateau"]["under_trained"]  # +0.5 point: within the tolerance
    assert data["arms"]["fedex_lora"]["plateau"] is None and data["plateau_pending"] == []
    line = protocol.plateau_line(data)
    assert "under-trained at 20 rounds" in line and "fedsa_lora" in line and "flat: fedavg_lora_r8" in line
    # TREC: 30 clients x 4 validation examples; at 50% one seed's accuracy has an SE of 4.6 points.
    assert data["validation_examples"] == 120
    assert line.endswith("rests on 120 examples (SE up to 4.6 points), so gains or losses smaller than that are "
                         "not resolved.")
    # A longer run that loses more than one seed's SE is named apart, with its loss, not called flat.
    data["arms"]["fedavg_lora_r8"]["plateau"]["validation_gain"] = -0.05
    line = protocol.plateau_line(data)
    assert "worse with twice the rounds (validation accuracy lost beyond one seed's SE): fedavg_lora_r8 (-5.0)" in line
    assert "flat: none" in line
    # The tuning runs never mistake the longer run for a rate of the grid.
    assert protocol.choice(tmp_path, "trec_fewshot_iid", protocol.ARMS["fedsa_lora"], smoke=False)["learning_rate"] == 0.003


def test_method_claims_are_judged_for_ce_lora_as_specified_and_in_each_shared_basis():
    """METHOD.md §7: claim 1 (within a point of FedAvg-LoRA at > 100x fewer bytes) where one
    model suits everyone, claim 2 (personalized beats plain averaging of the same cores by
    > 3 SE) where clients differ; undecided below three seeds."""
    import numpy as np

    def arm(accuracies, mb, seeds=3):
        # 1,000 parameters of head and LayerNorms travel beside every arm's adapters.
        adapter = mb * 1000  # parameters per MB, as if 1 MB were 1,000 parameters
        runs = {seed: {"clients": np.asarray(accuracies) + 0.001 * seed, "sent_params_per_client": adapter + 1000,
                       "sent_adapter_params_per_client": adapter if seed == 0 and mb > 1 else None}
                for seed in range(seeds)}
        return {"seeds": list(runs), "mb_per_round": mb + 1.0}, runs

    arms = {"fedavg_lora_r8": arm([0.90, 0.80, 0.85], 80.0), "celora": arm([0.50, 0.40, 0.45], 4.0),
            "celora_avg": arm([0.50, 0.41, 0.44], 4.0), "celora_weight_svd_r16": arm([0.90, 0.80, 0.84], 0.5),
            "fed_sb_weight_svd_r16": arm([0.80, 0.70, 0.75], 0.5), "celora_weight_svd_r32": arm([0.9] * 3, 1.0, 2)}
    rows = {name: row for name, (row, _) in arms.items()}
    by_arm = {name: runs for name, (_, runs) in arms.items()}
    # Runs recorded before summaries split the adapters out get their share by subtraction.
    protocol._adapter_bytes(rows, by_arm)
    assert rows["celora_weight_svd_r16"]["adapter_mb_per_round"] == pytest.approx(0.5)
    assert rows["fedavg_lora_r8"]["adapter_mb_per_round"] == pytest.approx(80.0)
    iid = protocol.claims("trec_fewshot_iid", rows, by_arm)
    assert set(iid) == {"claim_1"}  # IID: claim 2 is about non-IID clients
    one = iid["claim_1"]["arms"]
    assert one["celora"]["verdict"] == "fails" and one["celora"]["times_fewer_adapter_bytes"] == pytest.approx(20)
    # -0.3 point at 160x fewer adapter bytes: holds, though only 54x fewer bytes in all.
    assert one["celora_weight_svd_r16"]["verdict"] == "holds"
    assert one["celora_weight_svd_r16"]["times_fewer_bytes"] == pytest.approx(81 / 1.5)
    assert one["celora_weight_svd_r32"]["verdict"] == "undecided"
    clustered = protocol.claims("wordnet_clustered_labels", rows, by_arm)
    assert set(clustered) == {"claim_2"}
    two = clustered["claim_2"]["arms"]
    assert two["celora"]["verdict"] == "fails" and two["celora"]["versus"] == "celora_avg"  # +0.0: a tie
    assert two["celora_weight_svd_r16"]["verdict"] == "holds" and two["celora_weight_svd_r16"]["versus"] == (
        "fed_sb_weight_svd_r16")
    assert two["celora_weight_svd_r32"]["verdict"] == "undecided"
    assert "celora_weight_svd_r32, fed_sb_weight_svd_r32 not yet on three seeds" in protocol.claim_lines(clustered)[0]
    assert "identity" not in protocol.claim_lines(clustered)[0]
    # Chosen at a λ where W = I, the win over plain averaging is local training's: said so.
    rows["celora_weight_svd_r16"]["self_weight"] = 1.0
    identity = protocol.claims("wordnet_clustered_labels", rows, by_arm)["claim_2"]["arms"]["celora_weight_svd_r16"]
    assert identity["verdict"] == "holds" and identity["weights_are_identity"]
    assert "celora_weight_svd_r16: holds (+" in protocol.claim_lines({"claim_2": {"claim": "c", "arms": {
        "celora_weight_svd_r16": identity}}})[0]
    assert "fed_sb_weight_svd_r16, but at the chosen settings its weights are the identity: it is local training)" in (
        protocol.claim_lines({"claim_2": {"claim": "c", "arms": {"celora_weight_svd_r16": identity}}})[0])
    reviews = protocol.claims("movie_reviews_clustered_domains", rows, by_arm)
    assert set(reviews) == {"claim_1", "claim_2"}
    lines = protocol.claim_lines(iid)
    assert lines[0].startswith("Claim 1") and "celora: fails (-40.0 ± " in lines[0]
    assert "20x fewer adapter bytes, 16x fewer in all" in lines[0]
    with pytest.raises(ValueError, match="differ between arms"):
        by_arm["celora"][0]["sent_adapter_params_per_client"] = 1000.0  # 4,000 of base: not the others' 1,000
        protocol._adapter_bytes(rows, by_arm)


def test_the_cluster_oracle_runs_only_where_the_partition_has_clusters(tmp_path):
    oracle = protocol.ARMS["cluster_oracle"]
    assert _next(tmp_path, "cluster_oracle") == []  # TREC is IID: the oracle would be FedAvg-LoRA again
    wordnet = [run_id for run_id, _ in protocol.plan(tmp_path, "wordnet_clustered_labels", oracle, smoke=False)]
    assert wordnet == [f"wordnet_clustered_labels/cluster_oracle/lr{r:g}/seed0" for r in protocol.LEARNING_RATES]


def test_unknown_arms_and_settings_are_refused(capsys):
    assert protocol.main(["--arms", "fedavg_lora_r3", "--dry-run"]) == 2
    assert protocol.main(["--settings", "imagenet", "--dry-run"]) == 2
    assert "unknown" in capsys.readouterr().err


@pytest.mark.slow
def test_one_arm_end_to_end_on_smoke_runs(tmp_path, tiny_model_dir, wordnet_nouns, capsys):
    """fed_sb in the weight-SVD basis on the WordNet smoke setting (tiny BERT): both rates on
    seed 0, the chosen rate on seed 1, the plateau check (seed 0 with twice the rounds: the
    arm is on the frontier), the report with its frontier plot; a second call reruns nothing."""
    args = ["--smoke", "--settings", "wordnet_clustered_labels", "--arms", "fed_sb_weight_svd_r16",
            "--out", str(tmp_path), "--set", f"model.path={tiny_model_dir}"]
    assert protocol.main(args) == 0
    assert "ran 4 runs" in capsys.readouterr().out
    assert protocol.main(args) == 0
    assert "ran 0 runs" in capsys.readouterr().out
    assert protocol.main([*args, "--status"]) == 0
    assert capsys.readouterr().out.startswith(
        "wordnet_clustered_labels: 1 of 1 arms measured; 4 runs finished (")  # nothing left: no estimate
    runs = sorted(p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("summary.json")
                  if p.parent != tmp_path)
    where = "wordnet_clustered_labels/fed_sb_weight_svd_r16"
    assert {f"{where}/lr0.001/seed0", f"{where}/lr0.01/seed0"} < set(runs) and len(runs) == 4
    chosen = [run for run in runs if run.endswith("seed1")][0].split("/")[-2]
    assert f"{where}/{chosen}_2x_rounds/seed0" in runs
    assert not list(tmp_path.rglob("checkpoints"))
    assert not list(tmp_path.rglob("metrics.jsonl"))  # finished runs' records are gzipped
    records = protocol.records(tmp_path / where / "lr0.01/seed0")
    assert [r["round"] for r in records if "validation_accuracy_mean" in r] == [2]  # every other round, and the last
    assert [r["round"] for r in records if "test_accuracy_mean" in r] == [2]  # the last round only
    assert 0 <= records[-1]["validation_accuracy_mean"] <= 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    row = summary["settings"]["wordnet_clustered_labels"]["arms"]["fed_sb_weight_svd_r16"]
    assert row["seeds"] == [0, 1] and set(row["validation_by_rate"]) == {"0.001", "0.01"}
    assert row["plateau"]["rounds"] == 2 * len(records)
    assert summary["settings"]["wordnet_clustered_labels"]["frontier"] == ["fed_sb_weight_svd_r16"]
    assert (tmp_path / "wordnet_clustered_labels_frontier.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert "fed_sb_weight_svd_r16" in table
    assert "| wordnet_clustered_labels | Fed-SB | weight_svd | 16 | " in table  # the shared-basis table
    # Where the table's runs ran: the seeds of the chosen rate, on this machine's backend.
    backend = json.loads((tmp_path / where / "lr0.01/seed0/summary.json").read_text())["platform"]
    assert backend == jax.default_backend()
    machines = summary["settings"]["wordnet_clustered_labels"]["machines"]
    assert sum(machines.values()) == 2 and all(m.startswith(backend) for m in machines)
    assert f"Machines (the table's runs): 2 on {backend}" in table


def _fake_train(out, config):
    """In place of a real run: a finished run whose validation accuracy grows with the rate."""
    _fake_run(out.parent, out.name, validation=config.optimizer.learning_rate * 10)


def test_workers_share_the_grid_run_by_run(tmp_path, monkeypatch, capsys):
    """A run another process holds is left to it: the worker takes the next one in order,
    comes back for the held one once it is free, and waits while every run left is held
    (here the 'other process' finishes its run while this one waits)."""
    monkeypatch.setattr(protocol, "train", _fake_train)
    where = "trec_fewshot_iid/local"
    first, second, third = (f"{where}/lr{r:g}/seed0" for r in protocol.LEARNING_RATES)
    execute = lambda: protocol.execute(tmp_path, ["trec_fewshot_iid"], ["local"], smoke=False, limit=1)
    with protocol.claim(tmp_path, first) as ours:
        assert ours
        with protocol.claim(tmp_path, first) as again:  # a second claim of a held run fails
            assert not again
        assert protocol.running(tmp_path) == [first]
        assert execute() == 1
    assert (tmp_path / second / "summary.json").exists() and not (tmp_path / first).exists()
    assert protocol.running(tmp_path) == [] and not list((tmp_path / protocol.CLAIMS).iterdir())  # none left
    assert execute() == 1 and (tmp_path / first / "summary.json").exists()  # released: taken now

    def other_process_finishes(seconds):
        _fake_train(tmp_path / third, protocol.run_config(
            protocol.setting_base("trec_fewshot_iid", False), protocol.ARMS["local"], 0.01, 0, ()))

    monkeypatch.setattr(protocol.time, "sleep", other_process_finishes)
    capsys.readouterr()
    with protocol.claim(tmp_path, third):
        assert execute() == 1  # waited for the third rate, then planned again: the edge's extension
    assert "waiting: the 1 runs left to do now are held by other processes" in capsys.readouterr().out
    assert (tmp_path / f"{where}/lr0.03/seed0/summary.json").exists()


def test_a_claim_held_by_another_process_is_released_when_it_dies(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / protocol.CLAIMS / "s+a+lr0.01+seed0.lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with protocol.claim(tmp_path, "s/a/lr0.01/seed0") as ours:
            assert not ours
    finally:
        holder.kill()
        holder.wait()
    with protocol.claim(tmp_path, "s/a/lr0.01/seed0") as ours:
        assert ours


def test_compacting_keeps_every_record_and_skips_unfinished_runs(tmp_path):
    curve = [0.1 * k for k in range(1, 9)]
    _fake_run(tmp_path, "s/a/lr0.001/seed0", 0.8, curve=curve)
    _fake_run(tmp_path, "s/a/lr0.01/seed0", 0.3)
    (tmp_path / "s/a/lr0.01/seed0/checkpoints").mkdir()  # still running: left alone
    (tmp_path / "s/a/lr0.003/seed0").mkdir(parents=True)
    (tmp_path / "s/a/lr0.003/seed0/metrics.jsonl").write_text("{}\n")  # no summary: unfinished
    before = protocol.records(tmp_path / "s/a/lr0.001/seed0")
    text = (tmp_path / "s/a/lr0.001/seed0/metrics.jsonl").read_bytes()
    assert protocol.compact_finished(tmp_path) == 1
    assert not (tmp_path / "s/a/lr0.001/seed0/metrics.jsonl").exists()
    assert gzip.decompress((tmp_path / "s/a/lr0.001/seed0/metrics.jsonl.gz").read_bytes()) == text
    assert protocol.records(tmp_path / "s/a/lr0.001/seed0") == before
    assert protocol.final_validation(tmp_path / "s/a/lr0.001/seed0") == (0.8, 1.0)
    assert (tmp_path / "s/a/lr0.01/seed0/metrics.jsonl").exists() and (tmp_path / "s/a/lr0.003/seed0/metrics.jsonl").exists()
    assert protocol.compact_finished(tmp_path) == 0  # once is enough


def test_the_report_says_where_runs_ran():
    assert protocol._machine({}) == "cpu"  # summaries before the field: the protocol ran on CPUs only
    assert protocol._machine({"platform": "cpu", "device_kind": "cpu"}) == "cpu"
    assert protocol._machine({"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"}) == "gpu (NVIDIA H100 80GB HBM3)"
    assert protocol.machines_line({"cpu": 40, "gpu (NVIDIA H100 80GB HBM3)": 12}) == (
        "Machines (the table's runs): 40 on cpu, 12 on gpu (NVIDIA H100 80GB HBM3).")
    assert protocol.machines_line({}) == "Machines (the table's runs): none yet."


def test_twins_ignore_where_runs_write_and_which_rounds_read_the_test_split():
    """A configuration already run is copied, not rerun: the runs' output settings and the
    rounds that also read the test split (the last always does) do not make it another."""
    config = {"federation": {"rounds": 20, "test_every": 20}, "optimizer": {"learning_rate": 0.01},
              "checkpoint": {"every": 5}, "tracking": {"directory": "a"}}
    older = {"federation": {"rounds": 20}, "optimizer": {"learning_rate": 0.01}, "checkpoint": {"every": 1}}
    assert protocol._comparable(config) == protocol._comparable(older)
    other_rate = {**older, "optimizer": {"learning_rate": 0.003}}
    assert protocol._comparable(config) != protocol._comparable(other_rate)
    assert protocol._comparable({"federation": {"rounds": 40}}) != protocol._comparable(older)


def test_the_default_order_runs_what_the_issues_name_before_the_extra_oracles():
    order = protocol.ordered_arms(None)
    assert sorted(order) == sorted(protocol.ARMS)  # every arm once
    assert order[:4] == ["fedavg_lora_r8", "local", "celora", "cluster_oracle"]
    first_rank, first_basis = protocol.SHARED_BASIS_RANKS[0], protocol.SHARED_BASES[0]
    beside = [(basis, first_rank) for basis in protocol.SHARED_BASES]  # each basis's own oracle at the first rank,
    beside += [(first_basis, rank) for rank in protocol.SHARED_BASIS_RANKS[1:]]  # and the first basis's at every rank,
    for basis, rank in beside:  # right after CE-LoRA in that basis and rank
        assert order.index(f"cluster_oracle_{basis}_r{rank}") == order.index(f"celora_{basis}_r{rank}") + 1
    extra = [f"cluster_oracle_{i}_r{r}" for i in protocol.SHARED_BASES[1:] for r in protocol.SHARED_BASIS_RANKS[1:]]
    assert order[-len(extra):] == extra and order.index("centralized") < order.index(extra[0])
    assert protocol.ordered_arms(["local", "celora"]) == ["local", "celora"]  # named arms keep their order


def test_where_one_basis_is_asked_for_the_other_bases_arms_run_after_every_other_arm():
    order = protocol.ordered_arms(None)
    settings = ["trec_fewshot_iid", "movie_reviews_clustered_domains"]
    pairs = protocol.schedule(settings, order)
    assert sorted(pairs) == sorted((name, setting) for name in order for setting in settings)  # each once
    # On the shared-basis issue's settings the order is the arms' own, arm by arm across settings.
    both = [name for name, setting in pairs if setting == "trec_fewshot_iid"]
    assert both == order and pairs[:2] == [(order[0], settings[0]), (order[0], settings[1])]
    # On the others every arm in a basis after the first moves behind all the rest, in order.
    one = [name for name, setting in pairs if setting == "movie_reviews_clustered_domains"]
    later = [name for name in order if any(f"_{init}_r" in name for init in protocol.SHARED_BASES[1:])]
    assert later and one == [name for name in order if name not in later] + later
    assert one.index("celora_weight_svd_r64") < one.index("fed_sb_gradient_svd_r16")
    assert pairs.index(("centralized", settings[1])) < pairs.index(("fed_sb_gradient_svd_r16", settings[1]))


def test_cluster_finding_counts_found_merged_and_local_runs_by_server_settings_and_rate(tmp_path):
    """Every run whose server learned weights counts, tuning runs and longer checks too; the
    references, whose weights are given, do not. Found: all the weight a client gives away lies
    in its true cluster; local: it gives none away."""
    def run(arm, step, rate, beta, inside, own, seed=0):
        _fake_run(tmp_path, f"wordnet_clustered_labels/{arm}/{step}/seed{seed}", 0.5)
        run_dir = tmp_path / "wordnet_clustered_labels" / arm / step / f"seed{seed}"
        (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "weight_in_true_cluster_mean": inside,
                                                           "self_weight_mean": own}) + "\n")
        (run_dir / "config.json").write_text(json.dumps({
            "adapter": {"init": "weight_svd"}, "optimizer": {"learning_rate": rate},
            "aggregation": {"data_distance": "marginal", "beta": beta, "lam": 1.0}}))

    run("celora_weight_svd_r16", "lr0.01_beta0.0_lam1.0", 0.01, 0.0, 1.0, 0.2)
    run("celora_weight_svd_r16", "lr0.01_beta0.0_lam1.0", 0.01, 0.0, 0.75, 0.15, seed=1)  # two clusters merged
    run("celora_weight_svd_r32", "lr0.01_beta0.0_lam1.0_2x_rounds", 0.01, 0.0, 1.0, 0.2)
    run("celora_weight_svd_r16", "lr0.003_beta0.0_lam1.0", 0.003, 0.0, 1.0, 1.0)  # kept to itself
    run("celora_weight_svd_r16", "lr0.003_beta1.0_lam1.0", 0.003, 1.0, 0.6, 0.5)
    run("cluster_oracle_weight_svd_r16", "lr0.01", 0.01, 0.5, 1.0, 0.2)  # a reference: left out
    _fake_run(tmp_path, "wordnet_clustered_labels/fed_sb_weight_svd_r16/lr0.01/seed0", 0.2)  # no weights
    rows = protocol.cluster_finding(tmp_path, "wordnet_clustered_labels")
    assert [(row["beta"], row["by_rate"]) for row in rows] == [
        (0.0, {"0.003": {"runs": 1, "found": 0, "kept_to_itself": 1},
               "0.01": {"runs": 3, "found": 2, "kept_to_itself": 0}}),
        (1.0, {"0.003": {"runs": 1, "found": 0, "kept_to_itself": 0}})]
    assert rows[0]["basis"] == "weight_svd" and rows[0]["distance_since"] == "start"
    lines = protocol.cluster_finding_lines(rows)
    assert lines[2] == "| basis | data distance | β | λ | distance since | 0.003 | 0.01 |"
    assert lines[4] == "| weight_svd | marginal | 0 | 1 | start | 0/1 (1 local) | 2/3 |"
    assert lines[5] == "| weight_svd | marginal | 1 | 1 | start | 0/1 | - |"
    assert protocol.cluster_finding_lines([]) == []


def test_weights_and_parameter_distance_are_read_cluster_by_cluster():
    """Checked against explicit loops: clients 0, 2 in cluster 7 and 1, 3 in cluster 9."""
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(4), size=4)
    distance = rng.uniform(0.5, 2.0, (4, 4))
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0.0)
    clusters = [7, 9, 7, 9]
    blocks = protocol.by_cluster({"weights": weights.tolist(), "param_distance": distance.tolist()}, clusters)
    median = np.median([distance[i, j] for i in range(4) for j in range(4) if i != j])
    for a, ka in enumerate((7, 9)):
        rows = [i for i in range(4) if clusters[i] == ka]
        for b, kb in enumerate((7, 9)):
            cols = [j for j in range(4) if clusters[j] == kb]
            share = np.mean([sum(weights[i, j] for j in cols) for i in rows])
            pairs = [distance[i, j] / median for i in rows for j in cols if i != j]
            assert blocks["weights"][a][b] == pytest.approx(share, abs=5e-4)
            assert blocks["param_distance"][a][b] == pytest.approx(np.mean(pairs), abs=5e-4)
    assert np.allclose(np.sum(blocks["weights"], axis=1), 1.0, atol=2e-3)
    assert protocol.by_cluster({"weights": weights.tolist()}, clusters).keys() == {"weights"}
    assert protocol.by_cluster({"weights": None}, clusters) == {}
    assert protocol.by_cluster({"weights": weights.tolist()}, [0, 0, 0, 0]) == {}
    assert protocol.by_cluster({"weights": weights.tolist()}, None) == {}
    alone = protocol.by_cluster({"weights": weights.tolist(), "param_distance": distance.tolist()}, [7, 9, 9, 9])
    assert alone["param_distance"][0][0] is None and alone["param_distance"][1][1] is not None
    same = protocol.by_cluster({"weights": weights.tolist(), "param_distance": np.zeros((4, 4)).tolist()}, clusters)
    assert same["param_distance"] == [[0.0, 0.0], [0.0, 0.0]]  # a zero median leaves them unscaled, as the server does
