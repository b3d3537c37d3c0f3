"""Megatron indexed datasets (PREFIX.bin / PREFIX.idx): reading raw documents in, checking files out.

Input side: `iter_documents` turns JSONL or plain-text files into documents, with errors that name
the file and line (shared by `tools/train_tokenizer.py` and `tools/preprocess_data.py`).

Output side: `verify_indexed_dataset` and `max_token_id` check a dataset *without trusting it*,
before a training job spends hours on it. Megatron's own reader only `assert`s the magic and then
`numpy.frombuffer`s whatever counts the header claims, so a truncated or mismatched pair fails deep
inside training (or, worse, silently reads garbage). The format, from megatron-core's
`_IndexWriter` (identical in 0.16 and 0.19; little-endian)::

    .idx: b"MMIDIDX\\x00\\x00"  magic, 9 bytes
          <Q version (== 1)
          <B dtype code (DTYPE_CODES below)
          <Q S = number of sequences       <Q D = number of document boundaries (documents + 1)
          int32[S] sequence lengths (tokens)
          int64[S] sequence byte offsets into .bin (cumulative lengths * itemsize)
          int64[D] document boundaries as sequence indices: 0, ..., S
          int8[S]  sequence modes (multimodal datasets only)
    .bin: all token ids back to back, dtype from the code above

This module deliberately does not import megatron (a 5-7 s import), so the tools can reject bad
input instantly.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Optional, Tuple

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# megatron.core.datasets.indexed_dataset.DType (the tests check this copy against it)
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
JSONL_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Unusable input or dataset files. The message is one line naming the file and the problem."""


def token_dtype(vocab_size: int):
    """The .bin dtype for a vocabulary: uint16 halves the file when ids fit (Megatron's own rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def is_jsonl(path: str) -> bool:
    return os.fspath(path).lower().endswith(JSONL_SUFFIXES)


# ----------------------------------------------------------------------------------------- input
def starts_with_a_json_object(path: str) -> bool:
    """Whether a file's first non-blank line (read up to 1 MiB) is a JSON object: JSON Lines under another name."""
    with open(path, "rb") as f:
        for raw in f:
            line = raw[:1 << 20].strip()
            if line:
                try:
                    return isinstance(json.loads(line), dict)
                except ValueError:
                    return False
    return False


def check_input_file(path: str) -> None:
    """Fail fast, before any slow work, on an input that is missing, unreadable or empty."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: permission denied")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: drop a leading BOM
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None


def iter_jsonl_texts(path: str, json_key: str = "text") -> Iterator[Tuple[str, int]]:
    """Yield (text, line number) for every non-blank line of a JSONL file.

    Every line must be a JSON object whose `json_key` is a string; anything else is a DataError
    naming `path:line`, because silently skipping bad records hides broken upstream pipelines.
    """
    check_input_file(path)
    seen = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                what = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # json's "Invalid control character at"
                raise DataError(f"{path}:{lineno}: invalid JSON ({what} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if json_key not in obj:
                keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
                raise DataError(f"{path}:{lineno}: no key {json_key!r} (keys: {keys}); "
                                "choose the field with --json-key")
            text = obj[json_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: key {json_key!r} is {type(text).__name__}, "
                                "expected a string")
            seen += 1
            yield text, lineno
    if not seen:
        raise DataError(f"{path}: file is empty (no JSON lines)")


def read_text_lines(path: str) -> Iterator[str]:
    """Stream the non-blank lines of a text file (without line endings)."""
    check_input_file(path)
    seen = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, lineno).rstrip("\r\n")
            if line.strip():
                seen += 1
                yield line
    if not seen:
        raise DataError(f"{path}: file is empty (only whitespace)")


def read_text_file(path: str) -> str:
    """The whole file as one string (UTF-8, CRLF -> LF)."""
    check_input_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty (only whitespace)")
    return text.replace("\r\n", "\n")


def iter_documents(path: str, json_key: str = "text",
                   split_text_on_blank_lines: bool = False) -> Iterator[Tuple[str, str]]:
    """Yield (document text, "file:line") from one input file.

    `.jsonl`/`.json`: one document per line, text under `json_key`. Anything else is plain text:
    the whole file is one document (a book, a play) unless `split_text_on_blank_lines`, in which
    case every block of non-blank lines is a document (the blank lines between are dropped).
    """
    path = os.fspath(path)
    if is_jsonl(path):
        for text, lineno in iter_jsonl_texts(path, json_key):
            yield text, f"{path}:{lineno}"
        return
    text = read_text_file(path)
    if not split_text_on_blank_lines:
        yield text, f"{path}:1"
        return
    block, start = [], 0
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            start = start if block else lineno
            block.append(line)
        elif block:
            yield "\n".join(block), f"{path}:{start}"
            block = []
    if block:
        yield "\n".join(block), f"{path}:{start}"


# ---------------------------------------------------------------------------------------- output
TOKENIZER_RECORD = ".tokenizer.json"  # PREFIX.tokenizer.json: which tokenizer made PREFIX.bin / .idx


def tokenizer_record(tokenizer) -> dict:
    """The fingerprint written next to a dataset: a hash of the model file's bytes, not its path."""
    return {"model_sha256": tokenizer.unique_identifiers["model_sha256"], "vocab_size": tokenizer.vocab_size,
            "model_path": os.path.abspath(tokenizer.model_path)}


def write_tokenizer_record(prefix: str, tokenizer) -> None:
    tmp = f"{prefix}{TOKENIZER_RECORD}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(tokenizer_record(tokenizer), f, indent=1)
    os.replace(tmp, prefix + TOKENIZER_RECORD)


def tokenized_with(prefix: str, tokenizer) -> Optional[str]:
    """None if `prefix` was tokenized with `tokenizer`, "unknown" if it carries no record (made before records, or
    by another tool); raises DataError naming both tokenizers if it was made with another one."""
    try:
        with open(prefix + TOKENIZER_RECORD) as f:
            record = json.load(f)
    except FileNotFoundError:
        return "unknown"
    except (OSError, ValueError) as exc:
        raise DataError(f"{prefix}{TOKENIZER_RECORD}: unreadable ({exc})") from None
    if record.get("model_sha256") == tokenizer.unique_identifiers["model_sha256"]:
        return None
    raise DataError(f"{prefix} was tokenized with another tokenizer ({record.get('model_path')}, vocabulary "
                    f"{record.get('vocab_size')}) than this run's data.tokenizer_model={tokenizer.model_path} "
                    f"(vocabulary {tokenizer.vocab_size}): its token ids mean other pieces; re-tokenize it with "
                    f"tools/preprocess_data.py --tokenizer-model {tokenizer.model_path}")


def dataset_prefix(path) -> str:
    """An indexed dataset's prefix, given the prefix or its .bin / .idx file (what a shell completes)."""
    path = os.fspath(path)
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def _paths(prefix: str) -> Tuple[str, str]:
    prefix = dataset_prefix(prefix)
    return prefix + ".idx", prefix + ".bin"


def _read_index(prefix: str):
    """Parse and cross-check the .idx file; return (dtype, lengths, bin_path, documents)."""
    idx_path, bin_path = _paths(prefix)
    for path, what in ((idx_path, "index"), (bin_path, "data")):
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (the {what} file of dataset {idx_path[:-4]})")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if not (header.startswith(INDEX_MAGIC) or INDEX_MAGIC.startswith(header)):
        raise DataError(f"{idx_path}: not a Megatron index file (magic {header[:9]!r}, "
                        f"expected {INDEX_MAGIC!r})")
    if len(header) < HEADER_SIZE:
        raise DataError(f"{idx_path}: truncated header ({idx_size} bytes, need {HEADER_SIZE})")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != INDEX_VERSION:
        raise DataError(f"{idx_path}: unsupported index version {version} (expected {INDEX_VERSION})")
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path}: unknown dtype code {code} (valid: {sorted(DTYPE_CODES)})")
    dtype = np.dtype(DTYPE_CODES[code])
    if dtype.kind not in "iu":
        raise DataError(f"{idx_path}: dtype code {code} is {dtype.name}, not an integer token type")
    plain = HEADER_SIZE + 12 * n_seq + 8 * n_doc
    if idx_size not in (plain, plain + n_seq):  # + n_seq: int8 modes of a multimodal dataset
        state = "truncated" if idx_size < plain else "has trailing bytes"
        raise DataError(f"{idx_path}: {state}: {idx_size} bytes, but its header declares {n_seq} "
                        f"sequences and {n_doc} document boundaries ({plain} bytes)")
    if n_doc < 1:
        raise DataError(f"{idx_path}: corrupt: no document boundaries (expected at least [0])")
    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mm, np.int32, n_seq, HEADER_SIZE)
    pointers = np.frombuffer(mm, np.int64, n_seq, HEADER_SIZE + 4 * n_seq)
    docs = np.frombuffer(mm, np.int64, n_doc, HEADER_SIZE + 12 * n_seq)
    if n_seq and lengths.min() < 0:
        raise DataError(f"{idx_path}: corrupt: negative sequence length")
    expected_ptr = np.zeros(n_seq, np.int64)
    if n_seq:
        np.cumsum(lengths[:-1], out=expected_ptr[1:])
        expected_ptr *= dtype.itemsize
    if not np.array_equal(pointers, expected_ptr):
        bad = int(np.flatnonzero(pointers != expected_ptr)[0])
        raise DataError(f"{idx_path}: corrupt: sequence {bad} starts at byte {int(pointers[bad])}, "
                        f"expected {int(expected_ptr[bad])}")
    if docs[0] != 0 or docs[-1] != n_seq or (n_doc > 1 and np.any(np.diff(docs) < 0)):
        raise DataError(f"{idx_path}: corrupt: document boundaries must rise from 0 to {n_seq}")
    return dtype, lengths, bin_path, n_doc - 1, docs


def _verify(prefix: str):
    dtype, lengths, bin_path, documents, _ = _read_index(prefix)
    tokens = int(lengths.sum(dtype=np.int64))
    bin_size = os.path.getsize(bin_path)
    if bin_size != tokens * dtype.itemsize:
        state = "truncated" if bin_size < tokens * dtype.itemsize else "too long"
        raise DataError(f"{bin_path}: {state}: {bin_size} bytes, but the index declares {tokens} "
                        f"{dtype.name} tokens ({tokens * dtype.itemsize} bytes)")
    if tokens == 0:
        raise DataError(f"{bin_path}: dataset is empty (0 tokens)")
    return dtype, bin_path, documents, tokens


def verify_indexed_dataset(prefix: str) -> Tuple[int, int]:
    """Check PREFIX.idx/PREFIX.bin fully against each other; return (documents, tokens).

    Raises DataError (one line, naming the file) for a missing file, bad magic/version/dtype,
    an .idx whose size disagrees with its own counts, inconsistent offsets, or a .bin whose size is
    not tokens * itemsize (the usual sign of an interrupted copy). Reads only the index.
    `prefix` may also be given as PREFIX.bin or PREFIX.idx.
    """
    _, _, documents, tokens = _verify(prefix)
    return documents, tokens


def max_token_id(prefix: str, chunk_tokens: int = 1 << 24) -> int:
    """The largest token id in the dataset (verified first), scanning the .bin in chunks.

    Lets a trainer refuse `vocab_size <= max_token_id` up front instead of hitting an
    out-of-range embedding lookup mid-run. Negative ids (possible with int32 files) are a DataError.
    """
    dtype, bin_path, _, _ = _verify(prefix)
    data = np.memmap(bin_path, dtype=dtype, mode="r")
    hi, lo = -1, 0
    for start in range(0, data.shape[0], chunk_tokens):
        chunk = data[start:start + chunk_tokens]
        hi = max(hi, int(chunk.max()))
        lo = min(lo, int(chunk.min()))
    if lo < 0:
        raise DataError(f"{bin_path}: corrupt: contains negative token id {lo}")
    return hi


def _split_bounds(prefix: str, weights):
    """Per split: (first document, end document, first token, end token), cut as Megatron cuts it: by whole
    documents, split i holding documents [round(lo_i * D), round(hi_i * D)) of the normalised cumulative weights."""
    _, lengths, _, documents, boundaries = _read_index(prefix)
    seq_tokens = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    doc_tokens = seq_tokens[boundaries]  # tokens before each document boundary
    total = float(sum(weights))
    bounds, acc = [0], 0.0
    for w in weights:
        acc += w / total
        bounds.append(int(round(min(acc, 1.0) * documents)))
    return [(lo, hi, int(doc_tokens[lo]), int(doc_tokens[hi])) for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_token_counts(prefix: str, weights) -> Tuple[Tuple[int, int], ...]:
    """(documents, tokens) of each train/valid/test split as Megatron cuts it (see _split_bounds)."""
    return tuple((hi - lo, end - begin) for lo, hi, begin, end in _split_bounds(prefix, weights))


def split_tokens(prefix: str, weights=(1,), part: int = 0) -> np.ndarray:
    """The token ids of one split (0 train, 1 valid, 2 test; the whole dataset by default), memory-mapped:
    held-out perplexity scores exactly the documents training never saw."""
    dtype, bin_path, _, _ = _verify(prefix)
    _, _, begin, end = _split_bounds(prefix, weights)[part]
    return np.memmap(bin_path, dtype=dtype, mode="r")[begin:end]
