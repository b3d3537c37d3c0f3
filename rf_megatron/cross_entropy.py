"""The language-model loss when one tensor-parallel rank holds the whole vocabulary (parallel.cross_entropy).

Megatron's `vocab_parallel_cross_entropy` is written for a vocabulary split over TP ranks. On one rank it still
makes a fp32 copy of the [s, b, vocab] logits, keeps a fp32 softmax of it for the backward and passes over it about
a dozen times (`bench/step_traffic.py` counts them). torch.compile turns torch's own cross-entropy into fused
kernels that read the logits once each way and keep only two numbers per token for the backward, as torchtitan
compiles its loss. The loss is the same to fp32 rounding (tests/test_cross_entropy.py).

Choices: `megatron` (vocab_parallel_cross_entropy, any TP), `megatron_fused` (Megatron's native fused kernel, bf16
only), `compiled` (this module, TP1), `auto` (compiled on a real GPU at TP1, else megatron).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import first_line

def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss in fp32, shaped like `labels`; `logits` is `labels`' shape plus the vocabulary."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), reduction="none").view(labels.shape)


def resolve(choice: str, tensor_parallel: int, real_gpu: bool) -> str:
    """`auto` -> what this run uses: the compiled loss needs one TP rank and a GPU (on a CPU the suite stays
    eager; the simulated GPU cannot compile for "cuda")."""
    if choice != "auto":
        return choice
    return "compiled" if real_gpu and tensor_parallel == 1 else "megatron"


class CompiledCrossEntropy:
    """`token_cross_entropy` under torch.compile (static shapes: a training run has one microbatch shape, plus
    its evaluation's). `fallback`: where the compiler fails (no Triton or C++ compiler on the machine), say so
    once and use it for the rest of the run; without one, the error stands."""

    def __init__(self, fallback: Optional[Callable] = None, warn: Callable[[str], None] = print):
        self._compiled = torch.compile(token_cross_entropy, dynamic=False)
        self._fallback, self._warn = fallback, warn

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self._fallback(logits, labels)
        try:
            return self._compiled(logits, labels)
        except torch._dynamo.exc.TorchDynamoException as exc:  # the compiler, not the math, failed
            if self._fallback is None:
                raise
            self._warn(f"warning: torch.compile of the cross-entropy failed ({first_line(exc, 160)}); using "
                       "Megatron's vocab_parallel_cross_entropy (parallel.cross_entropy=megatron says so up front)")
            self._compiled = None
            return self._fallback(logits, labels)
