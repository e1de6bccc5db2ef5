"""The public surface: every exported name documented with a runnable, passing example."""

import doctest
import importlib
import inspect

import pytest

import celora_jax

EXPORTED = [getattr(celora_jax, name) for name in celora_jax.__all__]
# Exceptions and constants carry no example; everything else a user calls or builds does.
DOCUMENTED = [obj for obj in EXPORTED
              if (inspect.isfunction(obj) or inspect.isclass(obj))
              and not (inspect.isclass(obj) and issubclass(obj, Exception))]
MODULES = sorted({obj.__module__ for obj in DOCUMENTED})


def test_all_names_exist_and_are_unique():
    assert len(set(celora_jax.__all__)) == len(celora_jax.__all__)
    for name in celora_jax.__all__:
        assert hasattr(celora_jax, name), name


@pytest.mark.parametrize("obj", DOCUMENTED, ids=lambda obj: obj.__name__)
def test_every_public_name_has_an_example(obj):
    docstring = inspect.getdoc(obj) or ""
    assert "Examples:" in docstring and ">>>" in docstring, f"{obj.__name__} has no runnable example"


@pytest.mark.parametrize("obj", [o for o in DOCUMENTED if inspect.isfunction(o)],
                         ids=lambda obj: obj.__name__)
def test_public_functions_are_type_hinted(obj):
    signature = inspect.signature(obj)
    missing = [name for name, parameter in signature.parameters.items()
               if parameter.annotation is inspect.Parameter.empty
               and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]
    assert not missing, f"{obj.__name__}: parameters without type hints: {missing}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{obj.__name__}: no return hint"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_pass(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, module_name)
    assert tests, f"{module_name} has no doctests"
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0, f"{results.failed} docstring example(s) failed in {module_name} (see output)"
