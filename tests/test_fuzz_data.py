"""Data-file fuzzing: malformed files (random bytes, wrong columns, mixed types, huge rows,
non-UTF-8 text, nested JSON) either load as a valid dataset or raise DataError with a
clear message; never another exception."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celora_jax.data.text import DataError, TextDataConfig, load_text_dataset


def _load(path):
    try:
        dataset = load_text_dataset(TextDataConfig(path=str(path), group_column=None))
    except DataError as err:
        assert str(err) and "\n" not in str(err).strip()
        return None
    assert len(dataset.texts) == len(dataset.labels) > 0
    assert dataset.labels.dtype == np.int32 and dataset.labels.min() >= 0
    assert len(np.unique(dataset.labels)) >= 2 and dataset.num_classes >= 2
    return dataset


CELL = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(), st.none())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_random_bytes_as_a_csv(tmp_path, data):
    path = tmp_path / "random.csv"
    path.write_bytes(data)
    _load(path)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.fixed_dictionaries({"text": CELL, "label": CELL}), max_size=12),
       extra=st.sampled_from(["text", "label", "other"]))
def test_jsonl_rows_of_mixed_types(tmp_path, rows, extra):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({**row, extra: row.get(extra)}) + "\n" for row in rows))
    _load(path)


CONTAINER = st.one_of(st.dictionaries(st.sampled_from(["body", "title"]), st.text(max_size=6), min_size=1, max_size=2),
                     st.lists(st.text(max_size=6), min_size=1, max_size=3))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.one_of(CELL, CONTAINER), min_size=1, max_size=10), container=CONTAINER,
       where=st.integers(0, 10))
def test_texts_that_are_objects_or_lists_are_refused(tmp_path, texts, container, where):
    """A JSON object or list where the text should be never reaches training as its repr:
    the file is refused (unreadable, or one line naming the column and a row)."""
    texts.insert(min(where, len(texts)), container)
    path = tmp_path / "nested_texts.jsonl"
    path.write_text("".join(json.dumps({"text": text, "label": i % 2}) + "\n" for i, text in enumerate(texts)))
    with pytest.raises(DataError) as info:
        load_text_dataset(TextDataConfig(path=str(path), group_column=None))
    message = str(info.value)
    assert "\n" not in message.strip()
    assert "column 'text'" in message and "must hold text, but row" in message, message


@pytest.mark.parametrize("name, content, message", [
    ("object_texts.jsonl", b'{"text": {"body": "fine"}, "label": 1}\n{"text": {"body": "bad"}, "label": 0}\n',
     "column 'text' of {path} must hold text, but row 1 holds a dict ({{'body': 'fine'}})"),
    ("list_texts.jsonl", b'{"text": "fine", "label": 1}\n{"text": ["bad", "worse"], "label": 0}\n',
     "must hold text, but row 2 holds a list (['bad', 'worse'])"),
    ("mixed_labels.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n', "integers or strings, got int, str"),
    ("empty.csv", b"", "is empty"),
    ("header.csv", b"text,label\n", "has no rows"),
    ("one_class.csv", b"text,label\ngood,1\nfine,1\ngreat,1\n", "holds a single class ('1')"),
    ("columns.csv", b"review,stars\ngood,1\nbad,0\n", "has no column(s) ['text', 'label']"),
    ("floats.csv", b"text,label\ngood,0.5\nbad,1.5\n", "must hold integers or strings, got float"),
    ("huge_ids.csv", b"text,label\ngood,0\nbad,100000\n", "the head would need 100001 outputs"),
    ("beyond_int64.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": 9.3e18}\n',
     "class id 9300000000000000000: integer labels are class ids"),
    ("negative.csv", b"text,label\ngood,-1\nbad,1\n", "negative class ids"),
    ("missing.csv", b"text,label\ngood,\nbad,1\n", "missing values"),
    ("nested.jsonl", b'{"text": "a", "label": [1]}\n{"text": "b", "label": [2]}\n', "integers or strings"),
    ("latin1.csv", "text,label\ncaf\xe9,0\nna\xefve,1\n".encode("latin-1"), "cannot read"),
])
def test_malformed_files_give_one_clear_data_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=None) as info:
        load_text_dataset(TextDataConfig(path=str(path), group_column=None))
    assert message.format(path=path) in str(info.value), str(info.value)


def test_files_that_load_fine(tmp_path, caplog):
    huge = tmp_path / "huge.csv"
    huge.write_text("text,label\n" + "x" * 2_000_000 + ",0\nshort,1\n")
    assert len(_load(huge).texts[0]) == 2_000_000
    integral = tmp_path / "integral.csv"  # labels written as floats by pandas
    integral.write_text("text,label\na,0.0\nb,1.0\nc,1.0\n")
    assert _load(integral).labels.tolist() == [0, 1, 1]
    blank = tmp_path / "blank.csv"
    blank.write_text('text,label\n"",0\n"  ",1\nok,1\n')
    with caplog.at_level("WARNING"):
        assert _load(blank) is not None
    assert "2 of 3 rows have an empty 'text'" in caplog.text
    with pytest.raises(DataError, match="is a directory"):
        load_text_dataset(TextDataConfig(path=str(tmp_path)))
