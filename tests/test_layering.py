"""The package's import graph: its folders are layers and imports run only downwards, no
cycles, the server side never imports a model, no private names cross modules, and nothing
in the package imports the top-level scripts."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "celora_jax"
# The folders, bottom to top: a module imports its own layer and the layers below it only.
LAYERS = (
    ("argument checks", ("celora_jax._checks",)),
    ("kernels usable alone", ("celora_jax.lora", "celora_jax.server", "celora_jax.data", "celora_jax.privacy")),
    ("models", ("celora_jax.models",)),
    ("federated engine", ("celora_jax.federated",)),
    ("Flower deployment", ("celora_jax.flower",)),
    ("command line", ("celora_jax.cli",)),
    ("public API", ("celora_jax",)),
)
# The kernels are independent of each other: each imports the argument checks and itself.
INDEPENDENT = LAYERS[1][1]
# Inside the engine's folder, the run configuration (which composes every section's dataclass
# and names the method) sits below the engine: it reaches the method registry and the
# tracking section, never the code that runs a round.
RUN_CONFIGURATION = ("celora_jax.federated.config", "celora_jax.federated.overrides", "celora_jax.federated.presets")
CONFIGURATION_MAY_REACH = RUN_CONFIGURATION + ("celora_jax.federated.methods", "celora_jax.federated.strategies",
                                               "celora_jax.federated.tracking")
# What the server runs: it sees uploaded arrays only.
SERVER_SIDE = ("celora_jax.server", "celora_jax.federated.strategies", "celora_jax.federated.methods",
               "celora_jax.federated.server_node", "celora_jax.flower.server_app")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import anywhere in the module,
    lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (node.module, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in _imports(name) if target in MODULES} for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_detected():
    """The check above can fail: a cycle, even through a lazy import, is reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "celora_jax.federated.round" in _graph()["celora_jax.federated.loop"]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific folder holding ``module``."""
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if _within(module, (prefix,))]
    return max(matches)[1]


def _kernel(module: str) -> str:
    return next(prefix for prefix in INDEPENDENT if _within(module, (prefix,)))


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` that runs up the layers or across the independent kernels."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                found.append(f"{module} -> {target} ({LAYERS[layer_of(module)][0]} imports "
                             f"{LAYERS[layer_of(target)][0]})")
            elif layer_of(module) == layer_of(target) == 1 and _kernel(module) != _kernel(target):
                found.append(f"{module} -> {target} (the kernels are independent of each other)")
    return found


def test_imports_run_down_the_layers():
    wrong = upward_imports(_graph())
    assert not wrong, "\n".join(wrong)


def test_the_top_level_is_a_handful_of_layer_folders():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert len(entries) <= 10, entries
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    named = {prefix.split(".")[1] for _, prefixes in LAYERS for prefix in prefixes if prefix.count(".") == 1}
    assert folders == named - {"_checks"}, "every folder has its place in LAYERS"
    assert all(layer_of(module) is not None for module in MODULES)


def test_an_upward_import_is_reported():
    """The rule above can fail: a kernel reaching the engine, a kernel reaching another kernel
    and a model reaching Flower are each reported; the usual direction is not."""
    graph = {"celora_jax.server.gmm": {"celora_jax.federated.loop"},
             "celora_jax.lora.adapters": {"celora_jax.data.text", "celora_jax._checks"},
             "celora_jax.models.bert": {"celora_jax.flower.app", "celora_jax.lora.adapters"},
             "celora_jax.cli.main": {"celora_jax.federated.engine", "celora_jax.flower.app"}}
    wrong = upward_imports(graph)
    assert len(wrong) == 3, wrong
    assert [w.split(" ")[0] for w in wrong] == ["celora_jax.lora.adapters", "celora_jax.models.bert",
                                                "celora_jax.server.gmm"]


def test_the_run_configuration_sits_below_the_engine():
    """config.py composes every section and validates the method's options, so it reaches the
    method registry; it never reaches the code that runs rounds, tasks or models."""
    for module in RUN_CONFIGURATION:
        reached = sorted(m for m in _reachable(module) if m.startswith("celora_jax.federated")
                         and not _within(m, CONFIGURATION_MAY_REACH))
        assert not reached, f"{module} reaches {reached}"
        assert not any(m.startswith("celora_jax.models") for m in _reachable(module))


def _reachable(start: str) -> set[str]:
    graph, seen, todo = _graph(), set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph[node]
    return seen


@pytest.mark.parametrize("module", [m for m in sorted(MODULES) if m.startswith(SERVER_SIDE)])
def test_the_server_side_never_imports_a_model(module):
    reached = _reachable(module)
    models = sorted(m for m in reached if m.startswith(("celora_jax.models", "celora_jax.federated.tasks",
                                                        "celora_jax.federated.client", "celora_jax.federated.config",
                                                        "celora_jax.data", "celora_jax.cli")))
    assert not models, f"{module} reaches {models}"


def test_no_private_name_is_imported_across_modules():
    crossing = [(name, f"{target}.{imported}") for name in MODULES for target, imported in _imports(name)
                if imported and imported.startswith("_") and target.startswith("celora_jax")
                and imported != "__version__"]
    assert not crossing, crossing


def test_the_package_does_not_import_the_repository_scripts():
    scripts = [(name, target) for name in MODULES for target, _ in _imports(name)
               if target.split(".")[0] in ("experiments", "benchmarks", "tests", "tpu")]
    assert not scripts, scripts


def test_a_program_that_closes_over_megabytes_fails_the_suite():
    """The suite's guard (tests/conftest.py, pyproject's filterwarnings): weights captured by a
    jitted closure are compiled into the program; such a test errors, naming the capture."""
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np

    weights = jnp.asarray(np.ones((1024, 1024), np.float32))  # 4 MiB
    with pytest.raises(UserWarning, match="A large amount of constants were captured"):
        jax.jit(lambda x: x * weights)(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(jax.jit(lambda w, x: (x * w).sum())(weights, 2.0)) == 2.0 * 1024 * 1024  # an argument
