"""The documentation site builds in strict mode and its generated pages match the code."""

import dataclasses
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from celora_jax import config as config_lib
from celora_jax import config_docs

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sections():
    config = config_lib.RunConfig()
    yield "", config
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield field.name, value


@pytest.mark.parametrize("prefix, node", list(_sections()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_config_field_is_documented(prefix, node):
    docs = config_docs.attribute_docs(type(node))
    undocumented = [f.name for f in dataclasses.fields(node)
                    if not dataclasses.is_dataclass(getattr(node, f.name)) and not docs.get(f.name)]
    assert not undocumented, f"{type(node).__name__} fields without an Attributes entry: {undocumented}"


def test_config_reference_lists_every_key_with_its_default():
    reference = config_docs.config_reference()
    for prefix, node in _sections():
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if dataclasses.is_dataclass(value):
                continue
            key = f"{prefix}.{field.name}" if prefix else field.name
            assert f"| `{key}` | " in reference and f"`{value!r}`" in reference, key


def test_quickstart_page_shows_the_readme_commands():
    commands = _load_hooks().readme_commands()
    readme = (ROOT / "README.md").read_text()
    assert readme.splitlines()[2:6] == commands.splitlines()  # the first lines of the README
    assert "celora-jax run" in commands and "pytest" in commands


def test_docs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    configuration = (site / "configuration" / "index.html").read_text()
    assert "federation.rounds" in configuration and "aggregation.lam" in configuration
    server = (site / "api" / "server" / "index.html").read_text()
    assert "server_step" in server and "mixed_cores" in server
    assert not (site / "hooks.py").exists()


def test_docs_build_fails_on_a_broken_reference(tmp_path):
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    with open(tmp_path / "docs" / "concepts.md", "a") as handle:
        handle.write("\nSee [`server_step`][celora_jax.aggregation.server_stepp].\n")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "celora_jax.aggregation.server_stepp" in result.stdout + result.stderr
