"""A model family: one variant plus a fixed width/depth rule, so a family's size is its depth.

The rule (stated in every sweep header):

    hidden  = head_dim * max(1, round(aspect * depth / head_dim))   # width grows with depth
    heads   = hidden / head_dim                                     # fixed head size
    kv      = the largest divisor of heads that is <= heads / gqa   # gqa = query heads per KV head
    ffn     = ffn_multiple * round(ffn_ratio * hidden / ffn_multiple)

With head_dim 64, aspect 64 and ffn_ratio 3.5 this gives the paper's 82M (8 layers, 512 hidden,
8 heads, 1792 FFN) and 180M (12 / 768 / 12 / 2688) shapes. Everything else (vocab, sequence
length, norm, SwiGLU, ...) comes from the preset, identically for every family member.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from ..config import ModelConfig


def family_label(model: ModelConfig) -> str:
    """`vanilla`, `svformer`, `resformer` (identity) or `resformer_<lambda_mode>`, plus `_gqa<g>`
    when the model uses grouped-query attention."""
    label = model.variant
    if model.variant == "resformer" and model.lambda_mode != "identity":
        label += f"_{model.lambda_mode}"
    if model.kv_heads != model.num_attention_heads:
        label += f"_gqa{model.num_attention_heads // model.kv_heads}"
    return label


def parse_family(spec: str) -> Dict[str, str]:
    """`vanilla`, `resformer`, `resformer:learnable`, `svformer` -> model overrides."""
    variant, _, mode = spec.partition(":")
    out = {"model.variant": variant}
    if variant == "resformer":
        out["model.lambda_mode"] = mode or "identity"
    elif mode:
        raise ValueError(f"family {spec!r}: only resformer takes a lambda mode (resformer:learnable)")
    else:
        out["model.lambda_mode"] = "identity"
    return out


@dataclass(frozen=True)
class ShapeRule:
    head_dim: int = 64
    aspect: float = 64.0  # hidden / depth before rounding
    ffn_ratio: float = 3.5
    ffn_multiple: int = 64
    gqa: int = 1  # query heads per KV head (1: multi-head attention)

    def shape(self, depth: int) -> Dict[str, int]:
        hidden = self.head_dim * max(1, round(self.aspect * depth / self.head_dim))
        heads = hidden // self.head_dim
        kv = max([d for d in range(1, heads + 1) if heads % d == 0 and d * self.gqa <= heads] or [1])
        ffn = self.ffn_multiple * max(1, round(self.ffn_ratio * hidden / self.ffn_multiple))
        return {"num_layers": depth, "hidden_size": hidden, "num_attention_heads": heads,
                "num_query_groups": kv if kv != heads else None, "ffn_hidden_size": ffn}

    def describe(self) -> str:
        return (f"hidden = {self.head_dim}*max(1, round({self.aspect:g}*depth/{self.head_dim})); "
                f"heads = hidden/{self.head_dim}; "
                f"kv heads = largest divisor of heads <= heads/{self.gqa}; "
                f"ffn = {self.ffn_multiple}*round({self.ffn_ratio:g}*hidden/{self.ffn_multiple})")
