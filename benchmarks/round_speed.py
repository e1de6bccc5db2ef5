"""Benchmark: one federated round of the default preset, four ways, plus achieved FLOP/s.

In one run on the same machine (issue 9, item 4):

* ``engine``: our vmapped, sharded, jitted round step (``celora_jax.federated.engine``):
  all clients' local training and the personalized aggregation in one program;
* ``jax_loop``: the same JAX client code (one jitted client update) called in a Python loop
  over the clients, then the same jitted server step;
* ``pytorch``: a reference in the style of the authors' PyTorch code: transformers'
  PyTorch ``BertModel`` with a tri-factor LoRA module around every encoder linear layer,
  clients trained one after another with ``torch.optim.AdamW``, then the cores averaged;
* ``torch_compile``: the same, with the model's loss under ``torch.compile`` (TorchInductor;
  AOTAutograd compiles the backward pass too): the peer a PyTorch user would pick for speed.
  Its compilation falls in the warm-up round, which is not timed. ``--smoke`` compiles with
  the ``aot_eager`` backend instead (``--torch-compile-backend`` chooses): the same tracing
  and compiled backward without Inductor's kernels, whose C++ build costs a CI run ~45 s.

All four train the same parameters (A, B, C, LayerNorms, head) on the same real
movie-review batches (MiniLM, 10 clients, 8 steps of 16 x 64 tokens; the default preset),
with dropout, gradient clipping and a fresh AdamW each round. Reported: seconds per round
(the median over ``--rounds`` rounds after one warm-up/compile round), training examples/s
and the ratios.

FLOP/s, two ways, each divided by the measured time of one client step (from the engine's
round time) and by this machine's peak matmul FLOP/s, measured in the same run as the best
of several large matmuls:

* ``mfu``: the analytic count of the matrix products one training step must do
  (``benchmarks/flops.py``: frozen linears forward and input gradient, attention, adapters
  and head forward and backward; checked against the products JAX traces). This is model
  FLOPs utilization, the figure to compare across machines and implementations.
* ``fraction_of_peak``: XLA's cost analysis of the compiled step instead. It adds
  elementwise work and, on GPUs, undercounts fused and custom-call kernels (cuDNN
  attention), so it only compares runs on one backend.

On a GPU the PyTorch reference runs on the GPU too (under bf16 autocast when
``model.dtype=bfloat16``), and the peak is the best large matmul in the compute dtype
(XLA runs float32 matmuls on TF32 tensor cores there). ``--preset`` picks the run (the
``gpu`` preset: 64 clients, batch 32 x 256 tokens, bfloat16, cuDNN attention) and
``--set key=value`` changes it like ``celora-jax run --set``.

    python benchmarks/round_speed.py                         # writes benchmarks/results/round_speed.json
    python benchmarks/round_speed.py --smoke --out /tmp/round_speed.json
    python benchmarks/round_speed.py --skip-profile --set model.dtype=bfloat16 \
        --set partition.num_clients=32 --set model.max_length=128 \
        --out benchmarks/results/round_speed_h200_bf16.json   # as run on an H200
    python benchmarks/round_speed.py --preset gpu --skip-profile --out benchmarks/results/round_speed_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe as describe_machine  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "round_speed.json"
SMOKE = ["partition.num_clients=2", "partition.train_examples=8", "partition.test_examples=4",
         "partition.global_test_examples=0", "federation.batch_size=4", "federation.local_steps=1",
         "model.max_length=16"]


def _config(overrides: list[str], rounds: int, preset: str = "default"):
    from celora_jax.federated.config import apply_overrides
    from celora_jax.federated.presets import get_preset

    config = get_preset(preset)
    if config.model.architecture != "encoder":
        raise ValueError(f"preset {preset!r} runs model.architecture={config.model.architecture!r}; this benchmark "
                         "and its PyTorch peers train the encoder classifier")
    # Evaluate only after the last round, so the timed rounds are training + aggregation.
    return apply_overrides(config, [f"federation.rounds={rounds}", f"federation.eval_every={rounds}"] + overrides)


def analytic_step_flops(setup):
    """``benchmarks/flops.py``'s count for one client step of this setup's encoder."""
    from benchmarks.flops import encoder_step_flops
    from celora_jax.models import loading

    config = setup.config
    encoder = loading.read_encoder_config(config.model.path or loading.default_model_dir())
    return encoder_step_flops(encoder, config.federation.batch_size, config.model.max_length,
                              setup.task.client_params["lora"], setup.task.num_classes, config.model.pooling)


def time_engine(setup) -> list[float]:
    from celora_jax.federated import loop

    # The first round compiles and the last one evaluates: time the ones between.
    return [output.record["seconds"] for output in loop.iterate_rounds(setup)][1:-1]


def time_jax_loop(setup, rounds: int) -> list[float]:
    """The same client update, jitted once, called client by client; then the server step."""
    import jax
    import numpy as np

    from celora_jax.data import packing
    from celora_jax.federated import client as client_lib, loop
    from celora_jax.lora import roles as methods

    config, n = setup.config, setup.num_clients
    update = jax.jit(client_lib.make_client_update(setup.task.logits_fn, setup.roles, config.optimizer,
                                                   rounds * setup.local_steps))
    strategy = loop.server_strategy(setup)
    aggregate = jax.jit(strategy.aggregate)
    state = client_lib.init_client_state(setup.task.client_params, setup.roles, config.optimizer)
    states = [{"params": setup.task.client_params, "opt_state": state["opt_state"]} for _ in range(n)]
    stack = lambda trees: jax.tree.map(lambda *xs: np.stack(xs), *trees)
    sizes = jax.numpy.asarray(setup.sizes)
    server_state = strategy.init(methods.select(stack([s["params"] for s in states]), setup.roles,
                                                methods.SHARED), sizes)
    mask = jax.numpy.ones(n, bool)
    base = setup.task.base_params
    seconds = []
    for round_index in range(rounds):
        started = time.perf_counter()
        batches = packing.round_batches(setup.task.train, setup.local_steps, config.federation.batch_size,
                                        config.seed, round_index)
        keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), round_index), n)
        trained = []
        for i in range(n):
            new_state, _ = update(base, states[i], jax.tree.map(lambda x: x[i], batches), keys[i], round_index)
            trained.append(new_state)
        uploads = methods.select(stack([jax.device_get(s["params"]) for s in trained]), setup.roles, methods.SHARED)
        server_state, downloads, _ = aggregate(server_state, uploads, sizes, mask)
        downloads = jax.device_get(downloads)
        for i in range(n):
            mine = jax.tree.map(lambda x: x[i], downloads)
            kept = methods.select(trained[i]["params"], setup.roles, methods.PERSONAL, methods.FROZEN)
            states[i] = {"params": methods.combine(mine, kept), "opt_state": trained[i]["opt_state"]}
        seconds.append(time.perf_counter() - started)
    return seconds[1:]  # the first round compiles


def time_pytorch(setup, rounds: int, threads: int, compiled: bool = False, backend: str = "inductor") -> list[float]:
    """Sequential clients on transformers' PyTorch BERT with tri-factor LoRA modules, on the
    GPU when PyTorch sees one (bf16 autocast when the preset computes in bfloat16);
    ``compiled``: the loss (forward and, through AOTAutograd, backward) under ``torch.compile``
    with ``backend``."""
    import contextlib

    import torch
    import transformers

    from celora_jax.data import packing
    from celora_jax.models import loading

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = setup.config.model.dtype == "bfloat16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config, n = setup.config, setup.num_clients
    rank, scale = setup.task.adapter_config.rank, setup.task.adapter_config.scale
    model_dir = config.model.path or loading.default_model_dir()

    class TriLoRALinear(torch.nn.Module):
        """y = W x + b + scale · ((x A) C) B, W frozen (the authors' tri-factor module)."""

        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            self.linear = linear.requires_grad_(False)
            like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
            self.A = torch.nn.Parameter(torch.randn(linear.in_features, rank, **like) * 1e-3)
            self.C = torch.nn.Parameter(torch.eye(rank, **like))
            self.B = torch.nn.Parameter(torch.zeros(rank, linear.out_features, **like))

        def forward(self, x):
            return self.linear(x) + scale * (((x @ self.A) @ self.C) @ self.B)

    # float32 master weights whatever the checkpoint stores (transformers 5 defaults to its dtype)
    backbone = transformers.BertModel.from_pretrained(str(model_dir), add_pooling_layer=False,
                                                      dtype=torch.float32).to(device)
    backbone.requires_grad_(False)
    for layer in backbone.encoder.layer:
        for parent, name in ((layer.attention.self, "query"), (layer.attention.self, "key"),
                             (layer.attention.self, "value"), (layer.attention.output, "dense"),
                             (layer.intermediate, "dense"), (layer.output, "dense")):
            setattr(parent, name, TriLoRALinear(getattr(parent, name)))
    for module in backbone.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.requires_grad_(True)
    head = torch.nn.Linear(backbone.config.hidden_size, setup.task.num_classes).to(device)
    trainable = dict([(k, v) for k, v in backbone.named_parameters() if v.requires_grad]
                     + [(f"head.{k}", v) for k, v in head.named_parameters()])
    client_states = [{k: v.detach().clone() for k, v in trainable.items()} for _ in range(n)]

    def client_loss(ids, mask, labels):
        with autocast():
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return torch.nn.functional.cross_entropy(head(pooled).float(), labels)

    loss_of = torch.compile(client_loss, backend=backend) if compiled else client_loss
    cores = [k for k in trainable if k.endswith(".C")]
    seconds = []
    for round_index in range(rounds + 1):
        started = time.perf_counter()
        batches = packing.round_batches(setup.task.train, setup.local_steps, config.federation.batch_size,
                                        config.seed, round_index)
        backbone.train()
        for i in range(n):
            with torch.no_grad():
                for k, v in trainable.items():
                    v.copy_(client_states[i][k])
            optimizer = torch.optim.AdamW(trainable.values(), lr=config.optimizer.learning_rate,
                                          weight_decay=config.optimizer.weight_decay)
            for step in range(setup.local_steps):
                ids = torch.from_numpy(batches["input_ids"][i, step]).long().to(device)
                mask = torch.from_numpy(batches["attention_mask"][i, step]).long().to(device)
                labels = torch.from_numpy(batches["labels"][i, step]).long().to(device)
                loss = loss_of(ids, mask, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable.values(), config.optimizer.max_grad_norm)
                optimizer.step()
            client_states[i] = {k: v.detach().clone() for k, v in trainable.items()}
        with torch.no_grad():  # the server: size-weighted average of the cores
            for k in cores:
                mean = torch.stack([s[k] for s in client_states]).mean(0)
                for s in client_states:
                    s[k] = mean.clone()
        synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds[1:]  # the first round warms up


def step_flops(setup) -> float:
    """XLA's FLOP count of one jitted training step of one client (no loops in the program,
    so the count is exact: cost analysis does not multiply loop bodies by trip counts)."""
    import jax

    from celora_jax.data import packing
    from celora_jax.federated import client as client_lib

    config = setup.config
    update = client_lib.make_client_update(setup.task.logits_fn, setup.roles, config.optimizer, 1)
    state = client_lib.init_client_state(setup.task.client_params, setup.roles, config.optimizer)
    state = {"params": setup.task.client_params, "opt_state": state["opt_state"]}
    batches = packing.round_batches(setup.task.train, 1, config.federation.batch_size, config.seed, 0)
    one = jax.tree.map(lambda x: x[0], batches)  # [1 step, B, ...]
    compiled = jax.jit(update).lower(setup.task.base_params, state, one, jax.random.key(0), 0).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def profile_step(setup, repeats: int = 3, top: int = 12) -> dict:
    """Where one client's training step spends its time: forward alone, the gradient to the
    adapters, and the largest XLA ops of that gradient in a profiler trace."""
    import collections
    import glob
    import gzip
    import tempfile

    import jax

    from celora_jax.data import packing
    from celora_jax.federated import client as client_lib

    batches = packing.round_batches(setup.task.train, 1, setup.config.federation.batch_size, setup.config.seed, 0)
    batch = jax.tree.map(lambda x: x[0, 0], batches)
    full = client_lib.full_params(setup.task.base_params, setup.task.client_params)

    def loss(full, lora):
        return client_lib.task_loss(setup.task.logits_fn(full, lora, batch, None), batch)[0]

    forward = jax.jit(loss)
    gradient = jax.jit(jax.grad(loss, argnums=1))
    lora = setup.task.client_params["lora"]
    timings = {}
    for name, fn in (("forward_s", forward), ("gradient_to_adapters_s", gradient)):
        jax.block_until_ready(fn(full, lora))
        timings[name] = min(_timed(lambda: jax.block_until_ready(fn(full, lora))) for _ in range(repeats))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(gradient(full, lora))
        path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[-1]
        events = json.load(gzip.open(path))["traceEvents"]
    totals = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and "dur" in event and ("fusion" in name or name.startswith(("dot", "copy"))):
            totals[name] += event.get("dur", 0)
    timings["top_ops_ms"] = {name: dur / repeats / 1000 for name, dur in totals.most_common(top)}
    return timings


def peak_matmul_flops(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    best = min(_timed(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * size ** 3 / best


def _torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _torch_version() -> str:
    import torch

    return torch.__version__


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (after a warm-up)")
    parser.add_argument("--preset", default="default", help="an encoder preset: default (CPU-sized) or gpu")
    parser.add_argument("--smoke", action="store_true", help="2 clients, 1 step of 4 x 16 tokens")
    parser.add_argument("--skip-pytorch", action="store_true", help="no PyTorch peers (eager or compiled)")
    parser.add_argument("--skip-torch-compile", action="store_true", help="no torch.compile peer")
    parser.add_argument("--torch-compile-backend", default=None,
                        help="torch.compile's backend (default inductor; aot_eager under --smoke: the same "
                             "tracing and AOTAutograd backward without Inductor's C++ build, about 45 s cold on 2 "
                             "CPU cores, which times nothing a GPU's Triton kernels would)")
    parser.add_argument("--skip-profile", action="store_true", help="no profiler trace of one client step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a preset field (repeatable), e.g. model.dtype=bfloat16")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    import jax

    from celora_jax.federated import engine

    rounds = 1 if args.smoke else args.rounds
    compile_backend = args.torch_compile_backend or ("aot_eager" if args.smoke else "inductor")
    try:
        config = _config((SMOKE if args.smoke else []) + args.overrides, rounds + 2, args.preset)
    except ValueError as error:  # an unknown key or a bad value: say so before loading anything
        parser.error(str(error))
    setup = engine.prepare(config)
    fed = setup.config.federation
    examples_per_round = setup.num_clients * setup.local_steps * fed.batch_size
    results = {}
    timings = {"engine": lambda: time_engine(setup),
               "jax_loop": lambda: time_jax_loop(setup, rounds + 1)}
    if not args.skip_pytorch:
        timings["pytorch"] = lambda: time_pytorch(setup, rounds, os.cpu_count() or 1)
        if not args.skip_torch_compile:
            timings["torch_compile"] = lambda: time_pytorch(setup, rounds, os.cpu_count() or 1, compiled=True,
                                                            backend=compile_backend)
    for name, measure in timings.items():
        seconds = measure()
        median = statistics.median(seconds)
        results[name] = {"round_seconds": seconds, "median_round_s": median,
                         "examples_per_s": examples_per_round / median,
                         "tokens_per_s": examples_per_round * setup.config.model.max_length / median}
        print(f"{name}: {median:.2f} s per round, {examples_per_round / median:.1f} examples/s", flush=True)
    ratios = {f"engine_vs_{name}": results[name]["median_round_s"] / results["engine"]["median_round_s"]
              for name in results if name != "engine"}
    flops = step_flops(setup)
    step_seconds = results["engine"]["median_round_s"] / (setup.num_clients * setup.local_steps)
    on_accelerator = jax.default_backend() != "cpu"
    peak_dtype = setup.config.model.dtype if on_accelerator else "float32"
    peak = peak_matmul_flops(512 if args.smoke else (8192 if on_accelerator else 2048), dtype=peak_dtype)
    achieved = flops / step_seconds
    analytic = analytic_step_flops(setup)
    model_flops_per_s = analytic.train / step_seconds
    profile = None if args.skip_profile else profile_step(setup)
    report = {
        "machine": describe_machine(pytorch_device=_torch_device_name() if "pytorch" in results else None,
                                    torch=_torch_version() if "pytorch" in results else None),
        "settings": {"preset": args.preset + (" (smoke)" if args.smoke else ""), "overrides": args.overrides,
                     "clients": setup.num_clients,
                     "local_steps": setup.local_steps, "batch_size": fed.batch_size,
                     "max_length": setup.config.model.max_length, "rank": setup.task.adapter_config.rank,
                     "dtype": setup.config.model.dtype, "attention": setup.config.model.attention,
                     "remat": setup.config.model.remat, "timed_rounds": rounds,
                     "torch_compile_backend": compile_backend if "torch_compile" in results else None},
        "variants": results,
        "ratios": ratios,
        "flops_per_client_step": flops,
        "engine_seconds_per_client_step": step_seconds,
        "achieved_flops_per_s": achieved,
        "peak_matmul_flops_per_s": peak,
        "peak_matmul_dtype": peak_dtype,
        "fraction_of_peak": achieved / peak,
        "analytic_flops_per_client_step": {"train": analytic.train, "forward": analytic.forward,
                                           "frozen_linears_forward": analytic.frozen_linears,
                                           "attention_forward": analytic.attention,
                                           "adapters_forward": analytic.adapters, "head_forward": analytic.head},
        "model_flops_per_s": model_flops_per_s,
        "mfu": model_flops_per_s / peak,
        "profile_one_client_step": profile,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"ratios": ratios, "achieved_gflops": achieved / 1e9, "peak_gflops": peak / 1e9,
                      "fraction_of_peak": achieved / peak, "mfu": model_flops_per_s / peak}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
