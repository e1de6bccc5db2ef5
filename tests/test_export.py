"""PEFT export: a client's tri-LoRA adapter loaded by peft onto PyTorch BertModel gives our outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from celora_jax.lora import adapters
from celora_jax.models import bert, export, loading


def test_peft_folder_reproduces_our_adapted_encoder(minilm_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    config = loading.read_encoder_config(minilm_dir)
    params = {k: v for k, v in loading.read_checkpoint(minilm_dir).items() if k != "pooler"}
    adapter_config = adapters.AdapterConfig(rank=4, alpha=8.0)
    lora = adapters.init_adapters(jax.random.key(0), params, adapter_config)
    keys = iter(jax.random.split(jax.random.key(1), 200))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lora)

    folder = export.export_peft(lora, tmp_path / "client_0", rank=4, alpha=8.0, base_model=str(minilm_dir))
    assert not list(folder.glob("*.bin")) and (folder / "adapter_model.safetensors").is_file()

    tokenizer = loading.load_tokenizer(minilm_dir)
    batch = loading.encode_texts(tokenizer, ["A slow, tender and funny film.", "Dull."], 24)
    ours = bert.BertModel(config, lora_scale=adapter_config.scale).apply(
        {"params": params, "lora": lora}, batch["input_ids"], batch["attention_mask"])

    base = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                       attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long)).last_hidden_state
    plain = bert.BertModel(config).apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    assert float(jnp.abs(ours - plain).max()) > 1e-2  # the adapter really changes the output
    np.testing.assert_allclose(theirs.numpy(), np.asarray(ours), atol=1e-4)

    loaded, peft_config = export.load_peft(folder)
    assert peft_config["r"] == 4 and len(peft_config["target_modules"]) == 36
    expected = adapters.to_two_factor(lora)
    for (path, got), want in zip(sorted(adapters.adapter_modules(loaded).items()),
                                 [v for _, v in sorted(adapters.adapter_modules(expected).items())]):
        np.testing.assert_allclose(got["A"], want["A"], atol=1e-7)
        np.testing.assert_allclose(got["B"], want["B"], atol=1e-6)


def test_export_rejects_client_stacked_adapters(tmp_path):
    stacked = {"m": {"A": np.zeros((3, 4, 2)), "B": np.zeros((3, 2, 4))}}
    with pytest.raises(ValueError, match="one client's adapters"):
        export.export_peft(stacked, tmp_path, rank=2, alpha=2)


@pytest.mark.parametrize("method, init", [("celora", None), ("fed_sb", "weight_svd")])
def test_run_exports_a_peft_folder_per_client(tiny_model_dir, tmp_path, method, init):
    """In a shared frozen basis too: each client's pair is (A, C_i·B), so its update A·C_i·B
    reaches PEFT whole, though only C_i was trained."""
    import dataclasses

    from celora_jax.federated import engine

    config = tiny_config(tiny_model_dir, method)
    config = dataclasses.replace(config, export_peft=True, adapter=dataclasses.replace(config.adapter, init=init))
    result = engine.run(config, output_dir=tmp_path)
    folders = sorted((tmp_path / "adapters").iterdir())
    assert [f.name for f in folders] == [f"client_{i:04d}" for i in range(5)]
    loaded, peft_config = export.load_peft(folders[3])
    assert peft_config["base_model_name_or_path"] == str(tiny_model_dir)
    client = jax.tree.map(lambda x: np.asarray(x)[3], result.client_params["lora"]["backbone"])
    for path, tri in adapters.adapter_modules(client).items():
        got = adapters.adapter_modules(loaded)[path]
        np.testing.assert_allclose(got["A"], tri["A"], atol=1e-7)
        np.testing.assert_allclose(got["B"], tri["C"] @ tri["B"], atol=1e-6)
        np.testing.assert_allclose(got["A"] @ got["B"], tri["A"] @ tri["C"] @ tri["B"], atol=1e-6)
        assert np.abs(tri["C"]).max() > 0  # trained: the check is not of zeros


def test_decoder_adapters_export_to_peft_and_match_pytorch_llama(tmp_path):
    """A tri-LoRA decoder client, exported, loads into PEFT on transformers' PyTorch
    LlamaForCausalLM and gives our adapted logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import json

    import transformers
    from helpers import write_hf_llama
    from test_llama import TINY, tiny_params

    from celora_jax.models import llama

    model, params = tiny_params()
    base_dir = write_hf_llama(params, TINY, tmp_path / "base")

    lora = adapters.init_adapters(jax.random.key(1), params, adapters.AdapterConfig(rank=2, alpha=4.0,
                                                                                  target=llama.DECODER_TARGET))
    keys = iter(jax.random.split(jax.random.key(2), 1000))
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), lora)  # a trained client
    folder = export.export_peft(lora, tmp_path / "client", rank=2, alpha=4.0, base_model=str(base_dir))
    peft_config = json.loads((folder / "adapter_config.json").read_text())
    assert "model.layers.1.mlp.down_proj" in peft_config["target_modules"]
    loaded, _ = export.load_peft(folder)  # our paths back
    np.testing.assert_allclose(loaded["layers"]["layer_0"]["self_attn"]["q_proj"]["B"],
                               lora["layers"]["layer_0"]["self_attn"]["q_proj"]["C"]
                               @ lora["layers"]["layer_0"]["self_attn"]["q_proj"]["B"], atol=1e-6)

    reference = transformers.LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    reference = peft.PeftModel.from_pretrained(reference, str(folder)).eval()
    ids = np.array([[5, 17, 3, 90, 42, 8]])
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    ours, _ = llama.LlamaForCausalLM(TINY, lora_scale=2.0).apply({"params": params, "lora": lora}, jnp.asarray(ids))
    plain, _ = model.apply({"params": params}, jnp.asarray(ids))
    assert float(np.abs(np.asarray(ours) - np.asarray(plain)).max()) > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)
