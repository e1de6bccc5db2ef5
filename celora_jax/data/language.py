"""Next-token prediction examples for a decoder LM, built from plain texts (``model.objective
= "next_token"``, e.g. Shakespeare's speaker turns).

Each text becomes one sequence: a start token, then the text's tokens, truncated to fit.
Sequences are **left**-padded like the instruction examples (``celora_jax.data.instructions``),
so the decoder's positions and masks work the same way; here every position predicts.

Arrays for M texts and T = ``max_length`` tokens:
  ``input_ids``, ``attention_mask``: ``[M, T]``: start token + text without its last token;
  ``targets``, ``token_mask``: ``[M, T]``: the token each position must predict, and 1 where
  that position holds a real token. The ``token_mask`` key is what makes the client loss
  count tokens (``celora_jax.federated.client.next_token_loss``) instead of exact answers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# The document separator of GPT-2-style byte-level BPE vocabularies (SmolLM2's id 0).
DOCUMENT_START = "<|endoftext|>"


def start_token_id(tokenizer, bos_token_id: int) -> int:
    """The token every sequence starts with: the vocabulary's document separator if it has
    one (what the model saw between pre-training documents), else the configured BOS."""
    token = tokenizer.token_to_id(DOCUMENT_START)
    return int(bos_token_id if token is None else token)


def encode_next_token(tokenizer, texts: Sequence[str], max_length: int, pad_id: int,
                      start_id: int) -> dict[str, np.ndarray]:
    """Left-padded next-token examples of ``texts`` (see the module docstring). An empty text
    has no target (its ``token_mask`` row is all zero) and so adds nothing to loss or
    accuracy; a text longer than ``max_length`` tokens keeps its beginning."""
    encodings = tokenizer.encode_batch([str(t) for t in texts])
    m = len(texts)
    input_ids = np.full((m, max_length), pad_id, np.int32)
    attention_mask = np.zeros((m, max_length), np.int32)
    targets = np.full((m, max_length), pad_id, np.int32)
    token_mask = np.zeros((m, max_length), np.float32)
    for row, encoding in enumerate(encodings):
        sequence = [start_id] + encoding.ids[:max_length]
        length = len(sequence) - 1  # positions that predict a following token
        if length == 0:  # the start token alone, so that attention has a key; nothing to predict
            input_ids[row, -1], attention_mask[row, -1] = start_id, 1
            continue
        input_ids[row, max_length - length:] = sequence[:-1]
        attention_mask[row, max_length - length:] = 1
        targets[row, max_length - length:] = sequence[1:]
        token_mask[row, max_length - length:] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets, "token_mask": token_mask}
