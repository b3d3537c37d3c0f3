"""The UTF-8 bytes of exactly the tokens a held-out set's loss scored, so bits/byte divides the bits of those tokens
by the bytes of the same text (not by another file's bytes, nor by a corpus-wide average).

Every token id decodes to a fixed number of bytes: its piece with SentencePiece's "▁" as a space, one byte for a
byte-fallback piece (<0xNN>), none for control pieces (EOD, BOS, pad) or <unk>. With the tokenizer's dummy prefix
(a "▁" it adds before every document) the first piece of a document carries one byte the text does not have, so a
token that follows EOD counts one byte less when its piece starts with "▁".
"""
from __future__ import annotations

import re
from typing import Tuple

import numpy as np

SPACE = "\u2581"  # SentencePiece's "▁"
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def token_byte_counts(tokenizer) -> np.ndarray:
    """Bytes each token id stands for in the decoded text (the project's SentencePieceTokenizer)."""
    control = {i for i in (tokenizer.eod, tokenizer.bos, tokenizer.pad, tokenizer.unk) if i >= 0}
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(i)
        if i not in control:
            counts[i] = 1 if BYTE_PIECE.match(piece) else len(piece.replace(SPACE, " ").encode("utf-8"))
    return counts


def adds_dummy_prefix(tokenizer) -> bool:
    """Whether the tokenizer puts a "▁" before every document (SentencePiece's add_dummy_prefix)."""
    return tokenizer.id_to_piece(tokenizer.tokenize("x")[0]).startswith(SPACE)


def dummy_prefixed(tokenizer) -> np.ndarray:
    """Per token id: 1 where a document-initial piece carries the dummy prefix's extra byte."""
    if not adds_dummy_prefix(tokenizer):
        return np.zeros(tokenizer.vocab_size, dtype=np.int64)
    return np.array([tokenizer.id_to_piece(i).startswith(SPACE) for i in range(tokenizer.vocab_size)], dtype=np.int64)


def scored_bytes(inputs: np.ndarray, labels: np.ndarray, mask: np.ndarray, tokenizer, tables=None) -> int:
    """UTF-8 bytes of the scored `labels` (where `mask` is set); `inputs[i]` is the token before `labels[i]`."""
    counts, prefixed = tables or (token_byte_counts(tokenizer), dummy_prefixed(tokenizer))
    starts = inputs == tokenizer.eod
    per_token = counts[labels] - np.where(starts, prefixed[labels], 0)
    return int(per_token[mask.astype(bool)].sum())


def dataset_scored_bytes(dataset, tokenizer) -> Tuple[int, int]:
    """(tokens scored, their UTF-8 bytes) over every sample of a GPTDataset, as a whole-set evaluation
    (train.eval_full) scores it: each sample's labels where its loss mask is set."""
    tables = token_byte_counts(tokenizer), dummy_prefixed(tokenizer)
    tokens = n_bytes = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        inputs, labels, mask = (np.asarray(sample[k]) for k in ("tokens", "labels", "loss_mask"))
        tokens += int(mask.astype(bool).sum())
        n_bytes += scored_bytes(inputs, labels, mask, tokenizer, tables)
    return tokens, n_bytes
