"""A SentencePiece tokenizer shaped the way Megatron-Core's GPT datasets expect.

`GPTDatasetConfig(tokenizer=...)` is typed as Megatron's `MegatronTokenizerBase`, but the dataset
code only duck-types it. What megatron-core 0.16 / 0.19 actually read:

* `vocab_size` -- `GPTDatasetConfig.__post_init__` picks the token dtype code from it;
* `eod` -- `GPTDataset` uses it to reset position ids / attention masks / loss masks at document
  boundaries (`reset_position_ids`, `reset_attention_mask`, `eod_mask_loss`);
* `pad` -- labels equal to `pad` get loss mask 0 and tokens/labels equal to `pad` are rewritten
  to 0, so `pad` must be an id that never occurs in real data (SentencePiece never emits its pad
  piece; here it is id 0 by `tools/train_tokenizer.py` convention);
* `eos` / `eod` -- compared with `pad`: a collision silently disables pad masking (with a warning);
* `unique_identifiers` -- `MegatronDataset` JSON-dumps its config with
  `default=lambda obj: obj.unique_identifiers`, so without it building a dataset fails with an
  AttributeError. The MD5 of that JSON names the dataset's index cache files, so it must change
  whenever the token ids would change: it holds a hash of the model file's bytes, not its path.

The object is also picklable (DataLoader workers pickle the dataset config): state is the
serialized model, not a file path that may not exist on the worker's machine.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable, List

import sentencepiece as spm


class TokenizerError(ValueError):
    """A tokenizer model that cannot be used. The message is one line naming the model file."""


def _read_model_bytes(path: str) -> bytes:
    """Read the model file, turning OS errors into one-line TokenizerErrors."""
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer model {path}: no such file")
    if os.path.isdir(path):
        raise TokenizerError(f"tokenizer model {path}: is a directory, expected a .model file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"tokenizer model {path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise TokenizerError(f"tokenizer model {path}: file is empty")
    return data


class SentencePieceTokenizer:
    """Text <-> token ids with a SentencePiece model; Megatron-Core dataset compatible.

    Attributes: `model_path`, `vocab_size`, `eod` (== `eos`, the end-of-document id appended by
    `tools/preprocess_data.py`), `pad`, `bos`, `unk` (-1 when the model disables that piece),
    `unique_identifiers` (see module docstring).
    """

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = os.fspath(model_path)
        self._load(_read_model_bytes(self.model_path))

    def _load(self, proto: bytes) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception:  # sentencepiece raises RuntimeError with a multi-line C++ location
            raise TokenizerError(
                f"tokenizer model {self.model_path}: not a SentencePiece model (could not parse it)"
            ) from None
        if sp.eos_id() < 0:
            raise TokenizerError(
                f"tokenizer model {self.model_path}: has no end-of-sequence piece, which Megatron "
                "needs as the end-of-document (EOD) token"
            )
        self._proto = proto
        self._sp = sp
        self.vocab_size: int = sp.get_piece_size()
        self.eod: int = sp.eos_id()
        self.eos: int = self.eod
        self.pad: int = sp.pad_id()
        self.bos: int = sp.bos_id()
        self.unk: int = sp.unk_id()
        self.unique_identifiers = OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("model_sha256", hashlib.sha256(proto).hexdigest()),
                ("vocab_size", self.vocab_size),
            ]
        )

    def tokenize(self, text: str) -> List[int]:
        """Token ids for `text`; no BOS/EOS is added (EOD is the preprocessor's job)."""
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text for `ids` (numpy arrays and tensors welcome)."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self):
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state):
        self.model_path = state["model_path"]
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
