"""`model.vocab_size=null` (the default): the tokenizer's vocabulary, padded up to a multiple of
`model.make_vocab_size_divisible_by` x `parallel.tensor_parallel`, as Megatron-LM's --make-vocab-size-divisible-by
does, so that every TP rank holds an equal slice of the embedding and output layer and the matmul sizes suit the
kernels. Resolved once, when the run config is loaded (a SentencePiece load, no torch), so the config a run saves
(resume, export, the scaling tools) holds the number."""
from __future__ import annotations

from typing import Optional

from .config import ConfigError


def padded_vocab_size(vocabulary: int, divisible_by: int, tensor_parallel: int) -> int:
    """The smallest multiple of divisible_by * tensor_parallel that holds `vocabulary` ids."""
    multiple = max(divisible_by, 1) * max(tensor_parallel, 1)
    return -(-vocabulary // multiple) * multiple


def tokenizer_vocabulary(path: str) -> int:
    """Pieces in a SentencePiece model; a ConfigError (one line naming the file) when it cannot be read."""
    from .tokenizer import SentencePieceTokenizer, TokenizerError

    try:
        return SentencePieceTokenizer(path).vocab_size
    except TokenizerError as exc:
        raise ConfigError(str(exc)) from None


def resolve_vocab_size(cfg) -> Optional[str]:
    """Fill `cfg.model.vocab_size` when it is null; return why it cannot be (None: the config holds a number)."""
    model = cfg.model
    if model.vocab_size is not None:
        return None
    if not cfg.data.tokenizer_model:
        return ("model.vocab_size=null takes the tokenizer's vocabulary, but data.tokenizer_model is not set: set "
                "one of them")
    try:
        vocabulary = tokenizer_vocabulary(cfg.data.tokenizer_model)
    except ConfigError as exc:
        return f"data.tokenizer_model: {exc} (model.vocab_size=null takes its vocabulary)"
    model.vocab_size = padded_vocab_size(vocabulary, model.make_vocab_size_divisible_by,
                                         cfg.parallel.tensor_parallel)
    return None


def check_vocab_size(vocab_size: int, vocabulary: int, tokenizer_path: str) -> None:
    """An explicit model.vocab_size must hold every token id the tokenizer can produce."""
    if vocab_size < vocabulary:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary ({vocabulary}, "
                          f"{tokenizer_path}): raise it, or null takes the tokenizer's, padded")


def require_vocab_size(cfg) -> int:
    """`cfg.model.vocab_size`, resolved if it is null, for the tools that need a number (FLOPs, parameters)."""
    problem = resolve_vocab_size(cfg)
    if problem:
        raise ConfigError(problem)
    return cfg.model.vocab_size
