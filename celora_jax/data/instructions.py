"""Instruction-tuning examples for a decoder LM, built from labelled texts (ChatML).

Each labelled review becomes a one-turn chat: the user asks for the sentiment and a short
verdict, the assistant answers with a fixed sentence per label. Sequences are **left**-padded
so that every example ends at the last position; the answer then occupies the final
positions, which is what the loss, the exact-match metric and :func:`greedy_generate` rely
on.

Arrays for M examples, T tokens, K answer positions:
  ``input_ids``, ``attention_mask``: ``[M, T]`` (prompt + answer without its last token);
  ``targets``, ``target_mask``: ``[M, K]``: the next tokens the last K positions must predict,
  and 1 where that token belongs to the answer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from celora_jax.data.text import DataError

QUESTION = ("Is the sentiment of this movie review positive or negative? Answer with the sentiment "
            "and a short verdict.\n\nReview: {review}")
# The shipped movie reviews label 0 = negative, 1 = positive.
SENTIMENT_ANSWERS = {"0": "Negative. Verdict: skip it.", "1": "Positive. Verdict: worth watching."}


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """ChatML text (``<|im_start|>role\\ncontent<|im_end|>\\n``), SmolLM2's chat format."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


# A vision-language question: the image comes before the chat, so there is no text slot to fill.
IMAGE_QUESTION = "What item of clothing is this? Answer in a few words.{review}"


def answers_for(label_names: Sequence[str]) -> list[str]:
    """The assistant's answer for every class: the sentiment verdicts for 0/1 labels, else the
    class name itself."""
    names = list(label_names)
    if names == ["0", "1"]:
        return [SENTIMENT_ANSWERS[name] for name in names]
    return [f"{name}." for name in names]


def encode_instructions(tokenizer, texts: Sequence[str], labels: np.ndarray, answers: Sequence[str],
                        max_length: int, pad_id: int, end_of_turn: str = "<|im_end|>",
                        question: str = QUESTION) -> dict[str, np.ndarray]:
    """Tokenized chats for ``texts`` with the answer of each label (see module docstring).

    ``question`` holds ``{review}`` where each text goes; the text is truncated (from its
    end) so that the whole chat fits in ``max_length``. With empty texts (e.g.
    :data:`IMAGE_QUESTION`, the image being the model's prefix) only the fixed parts remain.

    Raises:
      DataError: ``max_length`` cannot hold the prompt's fixed parts plus the answer.
    """
    head, tail = chatml([{"role": "user", "content": question}]).split("{review}")
    # The space before the review belongs to its first word, as byte-level BPE expects.
    head_ids = tokenizer.encode(head.rstrip(" ")).ids
    tail_ids = tokenizer.encode(tail).ids
    answer_ids = [tokenizer.encode(answer + end_of_turn).ids for answer in answers]
    answer_length = max(len(ids) for ids in answer_ids)
    # The model sees the chat without its final token; K positions predict the answer.
    room = max_length + 1 - len(head_ids) - len(tail_ids) - answer_length
    has_text = any(str(t).strip() for t in texts)
    if room < (8 if has_text else 0):
        raise DataError(f"max_length {max_length} leaves {room} tokens for the review after the "
                        f"prompt ({len(head_ids) + len(tail_ids)} tokens) and the answer "
                        f"({answer_length}); use a larger model.max_length")
    reviews = tokenizer.encode_batch([" " + str(t).strip() if str(t).strip() else "" for t in texts])
    m, k = len(texts), answer_length
    input_ids = np.full((m, max_length), pad_id, np.int32)
    attention_mask = np.zeros((m, max_length), np.int32)
    targets = np.full((m, k), pad_id, np.int32)
    target_mask = np.zeros((m, k), np.float32)
    for row, (review, label) in enumerate(zip(reviews, np.asarray(labels))):
        answer = answer_ids[int(label)]
        sequence = head_ids + review.ids[:room] + tail_ids + answer
        inputs = sequence[:-1]
        input_ids[row, max_length - len(inputs):] = inputs
        attention_mask[row, max_length - len(inputs):] = 1
        # Position max_length - k + j predicts sequence token len(sequence) - k + j.
        following = sequence[len(sequence) - k:]
        targets[row] = following
        target_mask[row, k - len(answer):] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
            "target_mask": target_mask}
