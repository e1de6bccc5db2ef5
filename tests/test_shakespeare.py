"""Shakespeare by speaking role: the play parser, the shipped corpus under the natural
partition, next-token examples and loss, and the decoder's next-token smoke preset."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from celora_jax.data import corpora, language
from celora_jax.data.partition import PartitionConfig, partition
from celora_jax.data.text import DataError, TextDataConfig, load_text_dataset
from celora_jax.federated import client as client_lib
from celora_jax.federated.config import ConfigError, ModelConfig

# Both layouts of the archive's plays: "Hor." speaker lines (Hamlet) and upper-case names
# without a period (A Midsummer Night's Dream); cast list before the first heading.
PLAY = """HAMLET

PERSONS REPRESENTED.

Horatio, Friend to Hamlet.

ACT I.

Scene I. Elsinore.

[Enter Bernardo and Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand,
and unfold yourself.

[Exit Ghost.]

We do it wrong, being so majestical.

THESEUS
Go, Philostrate, [Exit PHILOSTRATE.]
Stir up the Athenian youth.

SCENE II. A room.

Lonely line without a speaker.
"""


def test_speaker_turns_parse_both_gutenberg_layouts():
    turns = corpora.speaker_turns(PLAY)
    assert turns == [
        ("Ber", "Who's there?"),
        # A stage direction does not end the turn: the speaker goes on after it.
        ("Fran", "Nay, answer me: stand,\nand unfold yourself.\nWe do it wrong, being so majestical."),
        ("THESEUS", "Go, Philostrate,\nStir up the Athenian youth."),
    ]


@pytest.mark.assets
def test_shakespeare_corpus_has_every_play_and_role(shakespeare):
    assert shakespeare.num_classes == 37  # the plays; the poems have no roles
    assert len(shakespeare.texts) > 29_000
    turns_per_role = np.bincount(shakespeare.groups)
    assert (turns_per_role >= 10).sum() > 580  # ASSETS.md: about 600 roles with 10 turns
    names = shakespeare.group_names
    assert turns_per_role[names.index("hamlet/Ham")] == turns_per_role.max() == 339
    # One client per role, the roles that speak most first, each client's turns its own.
    split = partition(shakespeare.labels, PartitionConfig(scheme="natural", num_clients=5, train_examples=32,
                                                          test_examples=16, global_test_examples=0),
                      shakespeare.groups)
    assert names[split.clusters[0]] == "hamlet/Ham" and len(set(split.clusters.tolist())) == 5
    for i, role in enumerate(split.clusters):
        assert set(shakespeare.groups[split.train[i]]) == set(shakespeare.groups[split.test[i]]) == {role}
        assert not set(split.train[i]) & set(split.test[i])


def test_missing_archive_names_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("CELORA_JAX_SHAKESPEARE", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(DataError, match="Shakespeare corpus needs .*absent.tar.gz: run setup.sh"):
        load_text_dataset(TextDataConfig(corpus="shakespeare"))


class _Encoding:
    def __init__(self, ids):
        self.ids = ids


class _WordTokenizer:
    """One token per word, id = word length + 10; <|endoftext|> is id 0."""

    def encode_batch(self, texts):
        return [_Encoding([len(w) + 10 for w in t.split()]) for t in texts]

    def token_to_id(self, token):
        return 0 if token == language.DOCUMENT_START else None


def test_next_token_examples_start_left_padded_and_shift_by_one():
    tokenizer = _WordTokenizer()
    start = language.start_token_id(tokenizer, bos_token_id=1)
    assert start == 0
    encoded = language.encode_next_token(tokenizer, ["to be or not", "", "a b c d e f g h"], 5, pad_id=2, start_id=start)
    np.testing.assert_array_equal(encoded["input_ids"][0], [2, 0, 12, 12, 12])
    np.testing.assert_array_equal(encoded["targets"][0], [2, 12, 12, 12, 13])
    np.testing.assert_array_equal(encoded["token_mask"][0], [0, 1, 1, 1, 1])
    np.testing.assert_array_equal(encoded["attention_mask"][0], [0, 1, 1, 1, 1])
    # An empty text: the start token alone, nothing to predict.
    np.testing.assert_array_equal(encoded["attention_mask"][1], [0, 0, 0, 0, 1])
    assert encoded["token_mask"][1].sum() == 0
    # A long text keeps its beginning: start + 4 words in, the first 5 words as targets.
    np.testing.assert_array_equal(encoded["input_ids"][2], [0, 11, 11, 11, 11])
    assert encoded["token_mask"][2].sum() == 5
    assert language.start_token_id(type("NoSeparator", (), {"token_to_id": lambda self, t: None})(), 7) == 7


def test_next_token_loss_counts_every_real_token():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 6)).astype(np.float32)
    targets = rng.integers(0, 6, (3, 4))
    token_mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]], np.float32)
    example_mask = np.array([1.0, 1.0, 0.0], np.float32)  # the third example is padding
    loss, (correct, count) = client_lib.task_loss(
        jnp.asarray(logits), {"targets": targets, "token_mask": token_mask, "example_mask": example_mask,
                              "labels": np.zeros(3, np.int32)})
    mask = token_mask * example_mask[:, None]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(count) == 7.0  # tokens, not examples
    assert float(correct) == float(((logits.argmax(-1) == targets) * mask).sum())
    np.testing.assert_allclose(
        float(loss), float((optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask).sum() / 7),
        rtol=1e-6)


def test_next_token_objective_needs_the_decoder():
    with pytest.raises(ConfigError, match="needs model.architecture='decoder', got 'encoder'"):
        ModelConfig(objective="next_token")
    with pytest.raises(ConfigError, match="model.objective must be 'labels' or 'next_token'"):
        ModelConfig(architecture="decoder", objective="generate")


@pytest.mark.assets
@pytest.mark.slow
def test_shakespeare_smoke_preset_learns_next_tokens_end_to_end(tmp_path, smollm2, shakespeare):
    from celora_jax.cli import main as cli
    from celora_jax.federated import setup as setup_lib
    from celora_jax.federated.presets import get_preset

    task = setup_lib.prepare(get_preset("shakespeare_natural_smoke")).task
    assert set(task.train) == {"input_ids", "attention_mask", "targets", "token_mask", "labels", "example_mask"}
    assert task.train["targets"].shape == (4, 4, 16) and task.test["token_mask"].shape == (4, 4, 16)
    # Each client is one role: the 4 roles that speak most (Hamlet first).
    assert [shakespeare.group_names[g] for g in task.clusters][0] == "hamlet/Ham"

    code = cli.main(["run", "--preset", "shakespeare_natural_smoke", "--methods", "celora", "--no-progress",
                     "--output-dir", str(tmp_path)])
    assert code == 0
    records = [json.loads(line) for line in
               (tmp_path / "shakespeare_natural_smoke" / "celora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    final = records[-1]
    # Token accuracy of a pre-trained LM on Shakespeare: well above chance (1/49152), far from 1.
    assert 0.05 < final["test_accuracy_mean"] < 0.9
    assert 1.0 < final["test_loss"] < 10.0  # per-token cross-entropy in nats
    # Cores of 7 matrices x 30 blocks (r = 8) and, shared too (share_base), the 61 RMSNorm scales.
    assert final["bytes_up_per_client"] == (7 * 30 * 64 + 61 * 576) * 4
