"""The configuration reference, generated from the config dataclasses themselves (fields,
type hints, defaults, docstrings), so the documentation cannot drift from the code."""

from __future__ import annotations

import dataclasses
import typing

from celora_jax.federated.config import RunConfig


def attribute_docs(cls: type) -> dict[str, str]:
    """{field name: description} parsed from the ``Attributes:`` section of ``cls``'s docstring.

    An entry may name several fields ("a, b: ..."); continuation lines are joined.
    """
    lines = (cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    current: list[str] = []
    entry_indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            if entry_indent is not None:
                break  # a blank line ends the section
            continue
        indent = len(line) - len(line.lstrip())
        entry_indent = indent if entry_indent is None else entry_indent
        if indent < entry_indent:
            break
        text = line.strip()
        if indent == entry_indent and ":" in text:
            names, description = text.split(":", 1)
            current = [name.strip() for name in names.split(",")]
            for name in current:
                docs[name] = description.strip()
        else:
            for name in current:
                docs[name] = f"{docs[name]} {text}"
    return docs


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if args:
        return " | ".join(_type_name(arg) for arg in args)
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def config_reference(config=None) -> str:
    """Markdown tables of every ``--set`` key of ``RunConfig``: type, default, meaning.

    Generated from the dataclasses themselves (fields, type hints, defaults, docstrings), so
    the documentation cannot drift from the code. ``config`` (default ``RunConfig()``)
    supplies the default values shown.
    """
    config = RunConfig() if config is None else config
    out = ["Set any key from the command line with `--set section.key=value` "
           "(or `--set key=value` for top-level keys), e.g. `--set federation.rounds=20`.", ""]
    sections = [("", config)] + [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                                 if dataclasses.is_dataclass(getattr(config, f.name))]
    for prefix, node in sections:
        cls = type(node)
        docs = attribute_docs(cls)
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        out += [f"## `{prefix or 'top level'}`", "", f"{summary} (`{cls.__module__}.{cls.__name__}`)", "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            value = getattr(node, field.name)
            if dataclasses.is_dataclass(value):
                continue
            key = f"{prefix}.{field.name}" if prefix else field.name
            meaning = docs.get(field.name, "").replace("|", "\\|")
            out.append(f"| `{key}` | `{_type_name(hints[field.name])}` | `{value!r}` | {meaning} |")
        out.append("")
    return "\n".join(out)
