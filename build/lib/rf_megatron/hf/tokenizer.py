"""A SentencePiece model (tools/train_tokenizer.py) as a Hugging Face fast tokenizer.

The HF folder gets `tokenizer.json` (a `tokenizers` pipeline equivalent to the SentencePiece model:
same pieces, same ids, byte fallback, dummy prefix), `tokenizer_config.json` naming the generic
`TokenizersBackend` class (so `AutoTokenizer.from_pretrained(folder)` works without remote code) and
the original `tokenizer.model` for reference. No BOS/EOS is added on encode: the pretraining data
(tools/preprocess_data.py) has none either, only an end-of-document `</s>` between documents.

`check_equivalent` encodes/decodes sample texts with both and raises if any id or text differs.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, List, Optional

# sentencepiece_model.proto piece types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPIECE = "\u2581"


class TokenizerExportError(ValueError):
    pass


def _load_proto(model_path: Path):
    try:
        from google.protobuf import message  # noqa: F401  (sentencepiece's model proto needs it)
        from transformers.convert_slow_tokenizer import import_protobuf

        proto = import_protobuf().ModelProto()
    except ImportError:
        raise TokenizerExportError("reading the SentencePiece model needs protobuf: pip install protobuf") from None
    try:
        proto.ParseFromString(Path(model_path).read_bytes())
    except Exception:
        raise TokenizerExportError(f"tokenizer model {model_path}: not a SentencePiece model") from None
    if not proto.pieces:
        raise TokenizerExportError(f"tokenizer model {model_path}: not a SentencePiece model (no pieces)")
    return proto


def _bpe_merges(pieces: List[str], scores: List[float]):
    """BPE merges in SentencePiece priority order (higher piece score merges first)."""
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, score in zip(pieces, scores):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def build_fast_tokenizer(model_path):
    """The `tokenizers.Tokenizer` equivalent of a SentencePiece BPE or unigram model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = _load_proto(model_path)
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    if ts.model_type == 1:  # UNIGRAM
        model = models.Unigram([(p, s) for p, s in zip(pieces, scores)], unk_id=ts.unk_id,
                               byte_fallback=ts.byte_fallback)
    elif ts.model_type == 2:  # BPE
        model = models.BPE({p: i for i, p in enumerate(pieces)}, _bpe_merges(pieces, scores),
                           unk_token=pieces[ts.unk_id] if ts.unk_id >= 0 else None, fuse_unk=True,
                           byte_fallback=ts.byte_fallback, dropout=None)
    else:
        raise TokenizerExportError(f"tokenizer model {model_path}: model type {ts.model_type} is not BPE or "
                                   "unigram; only those convert to a fast tokenizer")
    if ts.treat_whitespace_as_suffix:
        raise TokenizerExportError(f"tokenizer model {model_path}: treat_whitespace_as_suffix is not supported")
    tok = Tokenizer(model)
    # SentencePiece normalizes the whole text first (dummy prefix, spaces -> U+2581) and then splits
    # it into words at U+2581. A Metaspace pre-tokenizer would not add the prefix to text that already
    # starts with a space, so the prefix is the normalizer's job here.
    norms = []
    if ns.precompiled_charsmap:
        norms.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norms += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norms.append(normalizers.Prepend(_SPIECE))
    norms.append(normalizers.Replace(" ", _SPIECE))
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE, prepend_scheme="never",
                                                 split=bool(ts.split_by_whitespace))
    steps = [decoders.Replace(_SPIECE, " ")]
    if ts.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if ns.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    # Control pieces are special. User-defined symbols are split off before normalization (matching
    # them in normalized text would normalize the symbol too, dummy prefix included), so the word
    # right after one gets a dummy prefix that SentencePiece would not add: the one known difference.
    tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                            for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)])
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                    for p in proto.pieces if p.type == _USER_DEFINED])
    return tok, proto


def _piece(proto, index: int) -> Optional[str]:
    return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None


def save_hf_tokenizer(model_path, out_dir, model_max_length: Optional[int] = None):
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map and tokenizer.model into out_dir;
    returns the HF tokenizer and a dict of special token ids (bos/eos/pad/unk, None when absent)."""
    from transformers import PreTrainedTokenizerFast

    tok, proto = build_fast_tokenizer(model_path)
    ts = proto.trainer_spec
    special = {name: _piece(proto, getattr(ts, f"{name}_id")) for name in ("bos", "eos", "pad", "unk")}
    kwargs = {f"{name}_token": piece for name, piece in special.items() if piece is not None}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                 add_bos_token=False, add_eos_token=False,
                                 **({"model_max_length": model_max_length} if model_max_length else {}), **kwargs)
    hf.save_pretrained(str(out_dir))
    shutil.copyfile(model_path, Path(out_dir) / "tokenizer.model")
    ids = {name: (getattr(ts, f"{name}_id") if piece is not None else None) for name, piece in special.items()}
    return hf, ids


SAMPLE_TEXTS = (
    "Hello world",
    "  two leading spaces, trailing space ",
    "line one\nline two\n\n\ttabbed",
    "the king and the queen spoke thus: 'thou art noble'.",
    "Ünïcödé → ✓ 日本語 emoji 🙂",
    "",
    "a  b   c    d",
    "1234567890 !@#$%^&*()",
)


def check_equivalent(model_path, hf_tokenizer, texts: Iterable[str] = SAMPLE_TEXTS) -> None:
    """Raise TokenizerExportError if the HF tokenizer disagrees with SentencePiece on any text."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    # SentencePiece renders <unk> as " ⁇ " and the tokenizers library spaces user-defined symbols
    # differently when decoding: ids must agree everywhere, text only where neither occurs
    odd = {i for i, p in enumerate(_load_proto(model_path).pieces) if p.type not in (_NORMAL, _BYTE)}
    for text in texts:
        want = sp.encode(text, out_type=int)
        got = hf_tokenizer(text, add_special_tokens=True)["input_ids"]
        if got != want:
            raise TokenizerExportError(f"HF tokenizer disagrees with SentencePiece on {text!r}: {got} != {want}")
        if not odd.intersection(want) and hf_tokenizer.decode(got) != sp.decode(want):
            raise TokenizerExportError(f"HF tokenizer decodes {text!r} as {hf_tokenizer.decode(got)!r}, "
                                       f"SentencePiece as {sp.decode(want)!r}")
