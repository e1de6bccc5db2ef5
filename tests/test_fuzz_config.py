"""Config fuzzing: every field of every config dataclass (found from the dataclasses
themselves, so a new field is fuzzed without editing this file) gets values of the wrong
type, out of range, NaN/inf, empty, huge and negative. Resolving the config either succeeds
or raises our error naming the field; never another exception. Resolution only: no model,
no data is loaded."""

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from celora_jax._checks import ConfigError
from celora_jax.federated.config import RunConfig, apply_overrides

# Our errors: the config error, and the data and adapter errors raised by their sections'
# own checks (ConfigError, DataError and AdapterConfigError are all ValueErrors).
OURS = ValueError


def _fields():
    """(section, field name, section instance) for every leaf field of RunConfig."""
    config = RunConfig()
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            for inner in dataclasses.fields(value):
                if not dataclasses.is_dataclass(getattr(value, inner.name)):
                    yield field.name, inner.name, value
        else:
            yield "", field.name, config


FIELDS = list(_fields())
IDS = [f"{s}.{n}" if s else n for s, n, _ in FIELDS]

BAD_VALUES = st.one_of(
    st.integers(-10**12, 10**12), st.sampled_from([0, -1, 1, 2**31, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    st.text(max_size=20), st.sampled_from(["", " ", "x" * 10_000, "None", "auto", "\x00", "é"]),
    st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))

RAW_TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["nan", "inf", "-inf", "1e999", "[1, 2]", "{'a': 1}",
                                                            "None", "True", "''", "-1", "0", "10**12", "(", "'"]))


def _names_field(error: Exception, key: str, name: str) -> bool:
    message = str(error)
    return key in message or name in message


@pytest.mark.parametrize("section, name, node", FIELDS, ids=IDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=BAD_VALUES)
def test_constructing_a_section_with_any_value_succeeds_or_names_the_field(section, name, node, value):
    key = f"{section}.{name}" if section else name
    try:
        changed = dataclasses.replace(node, **{name: value})
        RunConfig(**{section: changed}) if section else None
    except OURS as err:
        assert _names_field(err, key, name), f"{key}={value!r}: {err}"


@pytest.mark.parametrize("section, name, node", FIELDS, ids=IDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(RAW_TEXT, BAD_VALUES.map(repr)))
def test_a_command_line_override_succeeds_or_raises_our_config_error_naming_the_key(section, name, node, raw):
    key = f"{section}.{name}" if section else name
    try:
        apply_overrides(RunConfig(), [f"{key}={raw}"])
    except ConfigError as err:
        assert key in str(err), f"{key}={raw!r}: {err}"


def test_the_fuzzer_sees_every_section_and_its_checks_can_fail():
    sections = {s for s, _, _ in FIELDS}
    assert sections >= {"", "model", "data", "partition", "adapter", "optimizer", "federation", "aggregation",
                        "checkpoint", "dp"}
    assert len(FIELDS) > 60
    with pytest.raises(ConfigError, match="federation.rounds. expects int"):
        apply_overrides(RunConfig(), ["federation.rounds='many'"])
    with pytest.raises(ConfigError, match="optimizer.learning_rate must be a finite number"):
        dataclasses.replace(RunConfig().optimizer, learning_rate=math.nan)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        apply_overrides(RunConfig(), ["seed=-1"])


def test_bool_fields_take_true_and_false_as_shells_spell_them():
    config = apply_overrides(RunConfig(), ["optimizer.dropout=false", "model.scan_layers=TRUE"])
    assert config.optimizer.dropout is False and config.model.scan_layers is True
    assert apply_overrides(RunConfig(), ["optimizer.dropout=True"]).optimizer.dropout is True
    with pytest.raises(ConfigError, match="optimizer.dropout. expects bool, got 'no'"):
        apply_overrides(RunConfig(), ["optimizer.dropout=no"])
