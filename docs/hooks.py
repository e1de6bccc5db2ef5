"""MkDocs hook: pages that are generated from the code, so they cannot drift from it.

* ``<!-- readme-commands -->`` becomes the two commands at the top of README.md.
* ``<!-- config-reference -->`` becomes the tables of ``celora_jax.cli.config_docs.config_reference``.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_commands() -> str:
    """The first fenced code block of README.md (the two quickstart commands)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```bash\n.*?```", text, flags=re.S)
    if match is None:
        raise ValueError("README.md has no ```bash block with the quickstart commands")
    return match.group(0)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- readme-commands -->" in markdown:
        markdown = markdown.replace("<!-- readme-commands -->", readme_commands())
    if "<!-- config-reference -->" in markdown:
        from celora_jax.cli.config_docs import config_reference

        markdown = markdown.replace("<!-- config-reference -->", config_reference())
    return markdown
