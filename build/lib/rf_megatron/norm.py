"""A torch norm that works under sequence parallelism (the local spec's own refuses it).

Under sequence parallelism each TP rank normalises a different slice of the sequence, so the
norm's weights get partial gradients; marking them `sequence_parallel` makes Megatron's
`finalize_model_grads` sum them over the TP group (as it does for Transformer Engine's norms).
"""
from __future__ import annotations

import torch


class SequenceParallelNorm:
    """RMSNorm or LayerNorm per `config.normalization`, with SP-aware weights.

    A class (not a function) because Megatron's `build_module` instantiates classes but returns
    plain functions unevaluated.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        return _build_norm(config, hidden_size, eps)


def _build_norm(config, hidden_size: int, eps: float):
    if config.normalization == "RMSNorm":
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    elif config.normalization == "LayerNorm":
        norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    else:
        raise ValueError(f"normalization={config.normalization!r} is not supported by the local spec")
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm
