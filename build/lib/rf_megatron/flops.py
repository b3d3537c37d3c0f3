"""Exact parameter counts and training FLOPs per token for every variant.

Matmul FLOPs only (2 per multiply-add), as Megatron and the Chinchilla papers count them; the
value mix (a few elementwise ops per value) is noise. Attention scores count the full s x s
matrix (what non-causal-aware kernels do, and Megatron's MFU formula assumes).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .value_residual_spec import has_value_projection, lambda_parameter_count


@dataclass
class Counts:
    embedding: int  # input embedding (+ output layer when untied)
    non_embedding: int  # transformer layers + final norm + lambdas

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding


def _value_rows(m: ModelConfig, layer: int) -> int:
    return m.kv_heads * m.head_dim if has_value_projection(m.variant, layer) else 0


def parameter_counts(m: ModelConfig) -> Counts:
    h, ffn = m.hidden_size, m.ffn_size
    q, k = m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    layers = 0
    for n in range(1, m.num_layers + 1):
        layers += h * (q + k + _value_rows(m, n)) + q * h  # QKV + output projection
        layers += h * ffn * (2 if m.swiglu else 1) + ffn * h  # MLP
        layers += 2 * norm + (2 * m.head_dim * (2 if m.normalization == "LayerNorm" else 1) if m.qk_layernorm else 0)
    embedding = m.vocab_size * h * (2 if m.untie_embeddings_and_output_weights else 1)
    return Counts(embedding=embedding, non_embedding=layers + norm + lambda_parameter_count(
        m.variant, m.lambda_mode, m.num_layers, m.sparse_layers))


def training_flops_per_token(m: ModelConfig, seq_length: int = None) -> float:
    """Forward + backward (3x forward) matmul FLOPs per trained token."""
    s = seq_length or m.seq_length
    h, ffn = m.hidden_size, m.ffn_size
    q, k = m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim
    forward = 0
    for n in range(1, m.num_layers + 1):
        forward += 2 * h * (q + k + _value_rows(m, n)) + 2 * q * h
        forward += 2 * h * ffn * (2 if m.swiglu else 1) + 2 * ffn * h
        forward += 2 * 2 * s * q  # QK^T and AV
    forward += 2 * h * m.vocab_size  # logits
    return 3.0 * forward
