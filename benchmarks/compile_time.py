"""Benchmark: compile time of the round step per method, blocks unrolled vs under ``nn.scan``
(issue #23, item 2).

For every (preset, method, layout) this runs one round in this process (``engine.run`` with
``federation.rounds=1``) with JAX's persistent compilation cache off, so that every program is
compiled for real, and listens to JAX's compile events (``jax.monitoring``) to add up, per
program, the seconds of

* ``trace``: Python tracing to a jaxpr,
* ``lower``: the jaxpr to an MLIR module,
* ``compile``: XLA's compilation of that module,

for the round step (the program ``round_step``: every client's local training and the server
step) and for all the run's programs together (``all_programs``: the round step, evaluation,
the data statistics, small helpers). ``run_seconds`` is the wall time of the whole run
(loading included). ``scan_over_unrolled`` is the round step's trace + lower + compile under
scan divided by the same unrolled. Each preset starts with one run that is not recorded,
so that its first measurement does not also pay the process's one-time costs.

    python benchmarks/compile_time.py             # MiniLM (every method), SmolLM2, DINOv2
    python benchmarks/compile_time.py --smoke --set model.path=DIR --out /tmp/compile.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe as describe_machine  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compile_time.json"

# (preset, methods): None = every registered method. The encoder setting has true clusters,
# so the cluster oracle runs there too.
FULL = (("wordnet_clustered_labels_smoke", None),
        ("instruct_smoke", ("fedavg_lora", "celora")),
        ("fashion_mnist_clustered_rotations_smoke", ("fedavg_lora", "celora")))
SMOKE = (("smoke", ("fedavg_lora",)),)
# The smoke presets take one local step per round; FedAvg-LoRA + fine-tuning's default of
# 2 fine-tuning steps needs at least 2 (the steps are a runtime loop either way).
METHOD_OVERRIDES = {"fedavg_lora_ft": ["federation.method_options.fedavg_lora_ft.steps=1"]}

PHASES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "compile"}
ROUND_STEP = "round_step"


def program(event_name: str) -> str:
    """The function a compile event is about: ``jit(round_step)`` and ``jit_round_step`` are
    ``round_step``."""
    match = re.fullmatch(r"jit\((.*)\)", event_name)
    return (match.group(1) if match else event_name).removeprefix("jit_")


class CompileEvents(contextlib.AbstractContextManager):
    """Seconds per (program name, phase) from JAX's compile events while ``recording``; a
    context manager whose exit removes its listener from JAX's process-wide list."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.active = False
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def __exit__(self, *exc_info) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event in PHASES:
            self.seconds[str(kwargs.get("fun_name", "?")), PHASES[event]] += duration

    @contextlib.contextmanager
    def recording(self):
        self.seconds.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def summary(self) -> dict:
        """The round step's seconds per phase, all programs' seconds per phase."""
        def phases(select):
            out = {phase: 0.0 for phase in PHASES.values()}
            for (name, phase), seconds in self.seconds.items():
                if select(name):
                    out[phase] += seconds
            out = {phase: round(seconds, 3) for phase, seconds in out.items()}
            out["total"] = round(sum(out.values()), 3)
            return out

        # The trace event names the Python function (round_step); lowering and compilation
        # name the jitted program (jit(round_step)).
        return {"round_step": phases(lambda name: program(name) == ROUND_STEP),
                "all_programs": phases(lambda name: True)}


@contextlib.contextmanager
def persistent_cache_off():
    """JAX's persistent cache off (the environment override too) inside, as it was after."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from celora_jax.federated import compile_cache

    saved_env, saved_dir = os.environ.get(compile_cache.ENVIRONMENT), jax.config.jax_compilation_cache_dir
    os.environ[compile_cache.ENVIRONMENT] = "off"
    try:
        compile_cache.enable("off")
        yield
    finally:
        if saved_env is None:
            os.environ.pop(compile_cache.ENVIRONMENT, None)
        else:
            os.environ[compile_cache.ENVIRONMENT] = saved_env
        jax.config.update("jax_compilation_cache_dir", saved_dir)
        compilation_cache.reset_cache()


def measure(preset: str, method: str, scan: bool, overrides: list[str], events: CompileEvents) -> dict:
    from celora_jax.federated import engine
    from celora_jax.federated.overrides import apply_overrides
    from celora_jax.federated.presets import get_preset

    # The method's options first: they must hold before the method is checked against them.
    config = apply_overrides(get_preset(preset), [*METHOD_OVERRIDES.get(method, []), f"federation.method={method}",
                                                  "federation.rounds=1", f"model.scan_layers={scan}",
                                                  "compilation_cache='off'", *overrides])
    started = time.perf_counter()
    with events.recording():
        result = engine.run(config)
    seconds = time.perf_counter() - started
    record = result.history[-1]
    return {**events.summary(), "run_seconds": round(seconds, 2),
            "test_accuracy_mean": record.get("test_accuracy_mean"), "train_loss": record["train_loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the smoke preset, FedAvg-LoRA only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of every run (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from celora_jax.federated.methods import method_names

    results: dict = {"machine": describe_machine(),
                     "smoke": args.smoke, "overrides": args.overrides, "presets": {}}
    with CompileEvents() as events, persistent_cache_off():
        for preset, methods in (SMOKE if args.smoke else FULL):
            methods = methods or method_names()
            if not args.smoke:
                measure(preset, methods[0], True, args.overrides, events)  # warm-up, not recorded
            per_method = {}
            for method in methods:
                layouts = {}
                for layout, scan in (("unrolled", False), ("scan", True)):
                    layouts[layout] = measure(preset, method, scan, args.overrides, events)
                    print(f"{preset} {method} {layout}: round step {layouts[layout]['round_step']}, "
                          f"run {layouts[layout]['run_seconds']} s", flush=True)
                unrolled, scanned = layouts["unrolled"]["round_step"]["total"], layouts["scan"]["round_step"]["total"]
                layouts["scan_over_unrolled"] = round(scanned / unrolled, 3) if unrolled else None
                per_method[method] = layouts
                results["presets"][preset] = per_method
                write(results, args.out)  # after every method: a long sweep that stops keeps its rows
    write(results, args.out)
    print(f"wrote {args.out}")
    return 0


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
