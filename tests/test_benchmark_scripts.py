"""The benchmarks/ scripts in their --smoke form: many clients, Flower vs our engine, round speed,
startup, compile time."""

import pytest


@pytest.mark.assets
@pytest.mark.slow
def test_many_clients_benchmark_smoke_writes_json(tmp_path, tiny_model_dir, movie_reviews_csv):
    """On the tiny BERT (the script's bookkeeping is under test; the shipped MiniLM runs end
    to end in tests/test_cli.py)."""
    import json

    from helpers import load_benchmark_module

    bench = load_benchmark_module("many_clients")
    out = tmp_path / "many.json"
    assert bench.main(["--smoke", "--model-dir", str(tiny_model_dir), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["model"] == str(tiny_model_dir)
    runs = {(r["num_clients"], r["client_block"]): r for r in report["runs"]}
    assert set(runs) == {(2, None), (2, 1)}
    for run in runs.values():
        # The tiny BERT's weights are mostly its 30,522 x 32 float32 embeddings (3.9 MB).
        assert run["peak_rss_mb"] > run["base_weights_mb"] > 3.9
        assert run["steady_round_s"] > 0
    # Blocks do not change the result.
    assert runs[(2, 1)]["final_test_accuracy"] == pytest.approx(runs[(2, None)]["final_test_accuracy"], abs=1e-6)
    with pytest.raises(SystemExit):  # a missing model is a usage error before any subprocess
        bench.main(["--smoke", "--model-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "no.json")])
    assert not (tmp_path / "no.json").exists()


@pytest.mark.assets
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


def test_round_speed_benchmark_smoke_with_overrides_writes_json(tmp_path, tiny_model_dir, movie_reviews_csv):
    """Every variant, the compiled PyTorch peer included, on a tiny BERT (compilation, not the
    model, is what a smoke run costs)."""
    import json

    from helpers import load_benchmark_module

    bench = load_benchmark_module("round_speed")
    out = tmp_path / "speed.json"
    # The GPU preset (bfloat16) shrunk by --smoke, with XLA's fused attention: cuDNN needs a GPU.
    overrides = ["model.attention=xla", f"model.path={tiny_model_dir}"]
    assert bench.main(["--preset", "gpu", "--smoke", "--skip-profile", *[a for o in overrides for a in ("--set", o)],
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert settings["preset"] == "gpu (smoke)" and settings["overrides"] == overrides
    assert (settings["dtype"], settings["attention"], settings["remat"]) == ("bfloat16", "xla", False)
    assert settings["torch_compile_backend"] == "aot_eager"  # a smoke run skips Inductor's C++ build
    assert set(report["variants"]) == {"engine", "jax_loop", "pytorch", "torch_compile"}
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
    # MFU: the analytic count (tests/test_flops.py checks it) over the same step time and peak.
    analytic = report["analytic_flops_per_client_step"]
    assert analytic["train"] > analytic["forward"] > analytic["frozen_linears_forward"] > 0
    assert report["model_flops_per_s"] == pytest.approx(analytic["train"] / report["engine_seconds_per_client_step"])
    assert 0 < report["mfu"] == pytest.approx(report["model_flops_per_s"] / report["peak_matmul_flops_per_s"])
    assert report["profile_one_client_step"] is None
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--set", "model.no_such_field=1", "--out", str(out)])
    with pytest.raises(SystemExit):  # the PyTorch peers train the encoder classifier only
        bench.main(["--preset", "instruct_smoke", "--smoke", "--out", str(out)])


@pytest.mark.assets
def test_startup_benchmark_smoke_writes_json(tmp_path, tiny_model_dir, movie_reviews_csv):
    """Cold then warm ``celora-jax run`` in fresh processes on one compilation cache (a tiny
    BERT, so that the test costs seconds): the cold run fills the cache, both finish round 1."""
    import json

    from helpers import load_benchmark_module

    bench = load_benchmark_module("startup")
    out = tmp_path / "startup.json"
    assert bench.main(["--smoke", "--skip-grid", "--set", f"model.path={tiny_model_dir}", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    cli = report["cli"]
    assert cli["cache_files_after_cold"] > 0
    for phase in ("cold", "warm"):
        assert 0 < cli[f"{phase}_round1_seconds"] < cli[f"{phase}_seconds"]
    assert cli["saved_seconds"] == pytest.approx(cli["cold_seconds"] - cli["warm_seconds"], abs=0.02)
    assert f"--set model.path={tiny_model_dir}" in cli["command"] and "grid_run" not in report


@pytest.mark.assets
def test_compile_time_benchmark_smoke_writes_json(tmp_path, tiny_model_dir, movie_reviews_csv):
    """One method in both layouts on a tiny BERT: the round step's compile events are found
    and summed, and the persistent cache is back as it was afterwards."""
    import json

    import jax

    from helpers import load_benchmark_module

    bench = load_benchmark_module("compile_time")
    assert bench.program("jit(round_step)") == bench.program("jit_round_step") == "round_step"
    cache_before = jax.config.jax_compilation_cache_dir
    out = tmp_path / "compile.json"
    overrides = [f"model.path={tiny_model_dir}", "model.max_length=16"]
    assert bench.main(["--smoke", *[a for o in overrides for a in ("--set", o)], "--out", str(out)]) == 0
    assert jax.config.jax_compilation_cache_dir == cache_before
    report = json.loads(out.read_text())
    assert report["overrides"] == overrides and report["machine"]["cpu_count"] >= 1
    layouts = report["presets"]["smoke"]["fedavg_lora"]
    for layout in ("unrolled", "scan"):
        step, programs = layouts[layout]["round_step"], layouts[layout]["all_programs"]
        # Cache off: the round step is traced, lowered and compiled for real in each run.
        assert step["trace"] > 0 and step["lower"] > 0 and step["compile"] > 0
        assert step["total"] == pytest.approx(step["trace"] + step["lower"] + step["compile"], abs=2e-3)
        assert programs["total"] >= step["total"] and layouts[layout]["run_seconds"] > programs["compile"]
    # Same run in both layouts (the smoke preset's dropout aside, which differs per layer).
    assert layouts["scan_over_unrolled"] == pytest.approx(
        layouts["scan"]["round_step"]["total"] / layouts["unrolled"]["round_step"]["total"], abs=1e-3)
