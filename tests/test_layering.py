"""The package's import graph: no cycles, the server side never imports a model, no
private names cross modules, and nothing in the package imports the top-level scripts."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "celora_jax"
# What the server runs: it sees uploaded arrays only.
SERVER_SIDE = ("celora_jax.aggregation", "celora_jax.similarity", "celora_jax.baselines", "celora_jax.gmm",
               "celora_jax.usable", "celora_jax.federated.strategies", "celora_jax.federated.methods",
               "celora_jax.wire", "celora_jax.federated.server_node")


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
                                                        "celora_jax.federated.client")))
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
