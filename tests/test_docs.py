"""The documentation site builds in strict mode and its generated pages match the code."""

import dataclasses
import re
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from celora_jax.cli import config_docs
from celora_jax.federated import config as config_lib

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
        handle.write("\nSee [`server_step`][celora_jax.server.aggregation.server_stepp].\n")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "celora_jax.server.aggregation.server_stepp" in result.stdout + result.stderr


# ---- What the README and the docs quote: numbers, commands and paths that exist. ----------

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"<!-- numbers: (.+?) -->")
# A measured number as the docs print it: a decimal, or an integer grouped by thousands.
QUOTED_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(?![\w.]*\d)")
SOURCE_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
# How a source's value may be shown: itself, as a percentage, or bytes (or MB) as MB or GB.
SCALES = (1.0, 100.0, 1e-3, 1e-6, 1e-9)


def _without_code(text: str) -> str:
    return re.sub(r"`[^`]*`", "", text)


def _blocks(text: str) -> list[str]:
    return [block for block in re.split(r"\n\s*\n", text) if block.strip()]


def marked_blocks(text: str) -> list[tuple[list[str], str]]:
    """(source paths, the block right after the marker) for every ``<!-- numbers: ... -->``."""
    found = []
    blocks = _blocks(text)
    for index, block in enumerate(blocks):
        match = MARKER.search(block)
        if match:
            rest = block[match.end():].strip()
            found.append((match.group(1).split(), rest or blocks[index + 1]))
    return found


def source_values(paths: list[pathlib.Path]) -> list[float]:
    values = []
    for path in paths:
        values += [float(v) for v in SOURCE_NUMBER.findall(path.read_text().replace(",", ""))]
    return values


def unsourced_numbers(block: str, values: list[float]) -> list[str]:
    """The numbers quoted in ``block`` that no source value rounds to (at the printed precision)."""
    missing = []
    for token in QUOTED_NUMBER.findall(_without_code(block)):
        quoted = float(token.replace(",", ""))
        decimals = len(token.split(".")[1]) if "." in token else 0
        tolerance = 0.5 * 10 ** -decimals + 1e-9
        if not any(abs(abs(v) * scale - quoted) <= tolerance for v in values for scale in SCALES):
            missing.append(token)
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_marked_number_is_in_its_source(page):
    """A table (or paragraph) after ``<!-- numbers: FILE ... -->`` quotes only numbers that its
    result files hold, at the precision printed (signs aside: the docs print a minus apart; also
    as a percentage, or bytes as MB or GB)."""
    for sources, block in marked_blocks(page.read_text()):
        paths = [ROOT / source for source in sources]
        assert all(path.is_file() for path in paths), f"{page.name}: a source is missing: {sources}"
        missing = unsourced_numbers(block, source_values(paths))
        assert not missing, f"{page.name}: {missing} are not in {sources}:\n{block[:300]}"


def test_every_number_the_readme_quotes_is_checked():
    """The README's measured numbers all sit in marked blocks (integers such as a rank or a
    count of clients are settings, not measurements)."""
    readme = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
    checked = {block for _, block in marked_blocks(readme)}
    unchecked = [block[:80] for block in _blocks(readme) if block not in checked and not MARKER.search(block)
                 and re.search(r"\d+\.\d+", re.sub(r"Python \d+\.\d+", "", _without_code(block)))]
    assert not unchecked, unchecked
    assert len(checked) >= 2


def test_the_number_check_can_fail():
    block = "| a | 89.8 ± 0.2 | 82.58 | 12,345 |"
    assert unsourced_numbers(block, [0.898, 0.0021, 82_580_000.0, 12345]) == []
    assert unsourced_numbers(block, [0.898, 0.0021, 82_580_000.0]) == ["12,345"]
    assert unsourced_numbers("89.9 and `1.5`", [0.898]) == ["89.9"]


REPOSITORY_PATH = re.compile(r"`((?:celora_jax|experiments|benchmarks|tests|scripts|examples|docs|tpu)/[\w./-]*)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_path_exists(page):
    """Paths in code spans (``celora_jax/federated/config.py``, ``experiments/results/...``)
    name files or folders of the repository."""
    missing = [path for path in REPOSITORY_PATH.findall(page.read_text())
               if not any(c in path for c in "*<{") and not (ROOT / path).exists()]
    assert not missing, missing


COMMAND = re.compile(r"(?:python -m (experiments|benchmarks)\.(\w+)|python (\w+/[\w/]+\.py)|celora-jax run[^\n`]*)")


def _commands(page: pathlib.Path) -> list[str]:
    text = page.read_text().replace("\\\n", " ")
    return [match.group(0) for match in COMMAND.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_command_exists(page):
    """Every ``python -m experiments.X``, ``python benchmarks/X.py`` and ``celora-jax run``
    quoted names a script, preset, method and ``--set`` key that exist."""
    from celora_jax.federated.methods import method_names
    from celora_jax.federated.presets import PRESETS

    fields = {f"{prefix}.{name}" if prefix else name for prefix, node in _sections()
              for name in (f.name for f in dataclasses.fields(node))}
    wrong = []
    for command in _commands(page):
        module = re.match(r"python -m (\w+)\.(\w+)", command)
        script = re.match(r"python (\S+\.py)", command)
        if module and not (ROOT / module.group(1) / f"{module.group(2)}.py").exists():
            wrong.append(command)
        if script and not (ROOT / script.group(1)).exists():
            wrong.append(command)
        for preset in re.findall(r"--preset[ =](\w+)", command):
            wrong += [command] if preset not in PRESETS else []
        for methods in re.findall(r"--methods[ =]([\w,]+)", command):
            wrong += [command] if any(m not in method_names() and m != "all" for m in methods.split(",")) else []
        for key in re.findall(r"--set[ =]([\w.]+)=", command):
            known = key in fields or key.startswith("federation.method_options.")
            wrong += [f"{command} ({key})"] if not known else []
    assert not wrong, wrong


def test_the_readme_library_quick_start_runs():
    """The README's Python quick start runs as printed and averages two clients' adapters."""
    import numpy as np

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (4, 10)
    kernel = namespace["average"]["params"]["layers_0"]["B"]
    np.testing.assert_allclose(kernel, namespace["adapters"]["params"]["layers_0"]["B"] + 0.25, atol=1e-6)
