"""``model.attention`` and ``model.remat``: the fused attention path and rematerialized
blocks against the reference einsums and stored activations, in every model and layout.

Each check compares one model with itself: same weights, same adapters moved away from
their init, padded or grouped-query attention where the model has them; logits and the
gradients to the adapters must agree up to float rounding. That remat really recomputes is
checked in the traced program (a ``jax.checkpoint`` per block), not assumed from the flag.
"""

import dataclasses
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_llama import TINY as TINY_DECODER
from test_scan_layers import _moved

from celora_jax import AdapterConfig, init_adapters
from celora_jax._checks import ConfigError
from celora_jax.federated.config import ATTENTION, ModelConfig
from celora_jax.lora.adapters import DEFAULT_TARGET, stack_layers
from celora_jax.models import bert, layers, llama, vit

TINY_ENCODER = bert.EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  max_position_embeddings=32)
TINY_VIT = vit.VisionConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, patch_size=4,
                            position_grid=7)


def _variant(config, attention="einsum", remat=False):
    return dataclasses.replace(config, attention=attention, remat=remat)


def _logits_and_grads(apply, params, adapters, *inputs, **kwargs):
    """Jitted logits and the gradient of a nonlinear scalar of them to the adapters."""
    def loss(lora):
        logits = apply({"params": params, "lora": lora}, *inputs, **kwargs)
        logits = logits[0] if isinstance(logits, tuple) else logits
        return jnp.sum(jnp.sin(logits)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapters)
    return logits, grads


def _assert_same(ours, reference, atol):
    chex.assert_trees_all_close(ours, reference, atol=atol, rtol=1e-4)


# jax.checkpoint's primitive prints as "remat2" in JAX 0.10 ("checkpoint" in other versions).
_REMAT = re.compile(r"\b(remat2?|checkpoint)\[")


def _remat_calls(fn, *args) -> int:
    return len(_REMAT.findall(str(jax.make_jaxpr(fn)(*args))))


def _blocks_checkpointed(apply, variables, *inputs) -> int:
    return _remat_calls(lambda v: apply(v, *inputs), variables)


def test_the_config_and_the_models_list_the_same_attention_paths():
    assert ATTENTION == layers.ATTENTION
    for config in (TINY_ENCODER, TINY_DECODER, TINY_VIT):
        with pytest.raises(ValueError, match="attention must be one of"):
            dataclasses.replace(config, attention="flash")
    with pytest.raises(ValueError, match="fused attention implementation"):
        layers.fused_attention(jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)), None, "einsum")


def test_model_config_refuses_unknown_paths_and_cudnn_in_float32():
    with pytest.raises(ConfigError, match="model.attention must be one of"):
        ModelConfig(attention="flash")
    with pytest.raises(ConfigError, match="half precision.*model.dtype"):
        ModelConfig(attention="cudnn")
    assert ModelConfig(attention="cudnn", dtype="bfloat16").attention == "cudnn"
    with pytest.raises(ConfigError, match="computes in float32 only"):  # the ViT: never cuDNN
        ModelConfig(architecture="vit", attention="cudnn", dtype="bfloat16")


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_encoder_fused_attention_and_remat_match_the_reference(scan):
    ids = jax.random.randint(jax.random.key(0), (3, 10), 1, 64)
    mask = jnp.ones_like(ids).at[1, 6:].set(0).at[2, 3:].set(0)  # padded rows: the mask matters
    reference = bert.SequenceClassifier(TINY_ENCODER, num_labels=3, scan_layers=scan)
    params = reference.init(jax.random.key(1), ids, mask)["params"]
    adapters = _moved(init_adapters(jax.random.key(2), params, AdapterConfig(rank=2, target=DEFAULT_TARGET)))
    expected = _logits_and_grads(reference.apply, params, adapters, ids, mask)
    variants = [("xla", True)] if scan else [("xla", False), ("einsum", True)]
    for attention, remat in variants:
        model = bert.SequenceClassifier(_variant(TINY_ENCODER, attention, remat), num_labels=3, scan_layers=scan)
        _assert_same(_logits_and_grads(model.apply, params, adapters, ids, mask), expected, atol=2e-5)
        # One checkpoint per block unrolled, one around the scanned block.
        want = (1 if scan else TINY_ENCODER.num_layers) if remat else 0
        assert _blocks_checkpointed(model.apply, {"params": params, "lora": adapters}, ids, mask) == want


def test_encoder_remat_draws_the_same_dropout_masks():
    """Training mode: recomputed blocks must redraw exactly the masks of the forward pass."""
    ids = jax.random.randint(jax.random.key(0), (2, 8), 1, 64)
    mask = jnp.ones_like(ids).at[1, 5:].set(0)
    reference = bert.SequenceClassifier(TINY_ENCODER, num_labels=2)
    params = reference.init(jax.random.key(1), ids, mask)["params"]
    adapters = _moved(init_adapters(jax.random.key(2), params, AdapterConfig(rank=2, target=DEFAULT_TARGET)))
    train = dict(deterministic=False, rngs={"dropout": jax.random.key(3)})
    expected = _logits_and_grads(reference.apply, params, adapters, ids, mask, **train)
    # Dropout is on: the training logits differ from the deterministic ones.
    assert not np.allclose(expected[0], reference.apply({"params": params, "lora": adapters}, ids, mask))
    remat = bert.SequenceClassifier(_variant(TINY_ENCODER, remat=True), num_labels=2)
    _assert_same(_logits_and_grads(remat.apply, params, adapters, ids, mask, **train), expected, atol=2e-5)


def test_decoder_fused_attention_and_remat_match_the_reference_and_generate_the_same_tokens():
    reference = llama.LlamaForCausalLM(TINY_DECODER)
    assert TINY_DECODER.num_kv_heads < TINY_DECODER.num_heads  # grouped-query attention
    prompts = jnp.asarray([[0, 0, 7, 9, 2, 5], [4, 8, 15, 16, 23, 42]])
    mask = prompts != 0  # left padding, as the decoder tasks pad
    params = reference.init(jax.random.key(0), prompts)["params"]
    adapters = _moved(init_adapters(jax.random.key(4), params, AdapterConfig(rank=2, target=llama.DECODER_TARGET)),
                      scale=0.2)
    expected = _logits_and_grads(reference.apply, params, adapters, prompts, mask)
    fused = llama.LlamaForCausalLM(_variant(TINY_DECODER, "xla"))
    _assert_same(_logits_and_grads(fused.apply, params, adapters, prompts, mask), expected, atol=5e-5)
    remat = llama.LlamaForCausalLM(_variant(TINY_DECODER, remat=True))
    _assert_same(_logits_and_grads(remat.apply, params, adapters, prompts, mask), expected, atol=5e-5)
    assert _blocks_checkpointed(remat.apply, {"params": params, "lora": adapters}, prompts, mask) == 2
    scanned = llama.LlamaForCausalLM(_variant(TINY_DECODER, "xla", remat=True), scan_layers=True)
    _assert_same(_logits_and_grads(scanned.apply, stack_layers(params), stack_layers(adapters), prompts, mask),
                 (expected[0], stack_layers(expected[1])), atol=5e-5)
    # Generation: the key/value cache path, where queries attend to earlier cache slots.
    variables = {"params": params, "lora": adapters}
    np.testing.assert_array_equal(llama.greedy_generate(fused, variables, prompts, mask, 5),
                                  llama.greedy_generate(reference, variables, prompts, mask, 5))


def test_vit_fused_attention_and_remat_match_the_reference():
    pixels = jax.random.normal(jax.random.key(5), (2, 28, 28, 3))
    reference = vit.VisionTransformer(TINY_VIT)
    params = reference.init(jax.random.key(6), pixels)["params"]
    adapters = _moved(init_adapters(jax.random.key(7), params, AdapterConfig(rank=2, target=DEFAULT_TARGET)))
    expected = _logits_and_grads(reference.apply, params, adapters, pixels)
    fused = vit.VisionTransformer(_variant(TINY_VIT, "xla", remat=True))
    _assert_same(_logits_and_grads(fused.apply, params, adapters, pixels), expected, atol=2e-5)
    scanned = vit.VisionTransformer(_variant(TINY_VIT, "xla", remat=True), scan_layers=True)
    _assert_same(_logits_and_grads(scanned.apply, stack_layers(params), stack_layers(adapters), pixels),
                 (expected[0], stack_layers(expected[1])), atol=2e-5)
    assert _blocks_checkpointed(scanned.apply, {"params": stack_layers(params), "lora": stack_layers(adapters)},
                                pixels) == 1


def _checkpoints_in_task(task) -> int:
    """``jax.checkpoint`` calls in the traced forward pass of a prepared task's model."""
    from celora_jax.federated.client import full_params

    params = full_params(task.base_params, task.client_params)
    batch = {name: jnp.asarray(values[0, :2]) for name, values in task.train.items() if name != "labels"}
    return _remat_calls(lambda p: task.logits_fn(p, task.client_params["lora"], batch, None), params)


def test_the_encoder_task_builds_its_model_with_the_run_s_attention_and_remat(tiny_model_dir, caplog):
    from helpers import tiny_config

    from celora_jax.federated.config import apply_overrides
    from celora_jax.federated.tasks import encoder

    config = apply_overrides(tiny_config(tiny_model_dir), ["model.attention=xla", "model.remat=true"])
    adapter = dataclasses.replace(config.adapter, kind="tri")
    with caplog.at_level("INFO", logger="celora_jax.federated.tasks.encoder"):
        assert _checkpoints_in_task(encoder.prepare(config, adapter)) == 2  # the tiny BERT's 2 blocks
    assert "applies no dropout to attention probabilities (the encoder's config asks for 0.1)" in caplog.text
    cudnn = apply_overrides(tiny_config(tiny_model_dir), ["model.attention=cudnn", "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="model.attention='cudnn' needs a CUDA GPU.*'cpu'"):
        encoder.prepare(cudnn, adapter)


def test_the_decoder_loader_carries_the_run_s_attention_and_remat(tmp_path, minilm_dir):
    from helpers import write_hf_llama

    from celora_jax.federated.config import RunConfig
    from celora_jax.federated.tasks import decoder

    params = llama.LlamaForCausalLM(TINY_DECODER).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    write_hf_llama(params, TINY_DECODER, tmp_path)
    shutil.copy(minilm_dir / "tokenizer.json", tmp_path / "tokenizer.json")  # any tokenizer: only loaded here
    model = ModelConfig(architecture="decoder", path=str(tmp_path), max_length=16, attention="xla", remat=True)
    config = RunConfig(model=model)
    _, model_config, _, _ = decoder.load_decoder(config, config.adapter)
    assert (model_config.attention, model_config.remat) == ("xla", True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off a GPU; on one the preset runs")
def test_the_gpu_preset_off_a_gpu_stops_with_one_line_before_loading_anything(capsys):
    from celora_jax.cli import main as cli

    assert cli.main(["run", "--preset", "gpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("celora-jax: error: model.attention='cudnn' needs a CUDA GPU; this process's JAX backend is "
                   "'cpu' (model.attention='xla' runs everywhere)")
