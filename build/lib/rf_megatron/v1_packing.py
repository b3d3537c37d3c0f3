"""Carrying V_1 to the layers that need it.

Inside one model chunk, layer 1 writes V_1 into a `V1Slot` and later layers read it.
Between pipeline stages (and through full activation recompute, whose checkpoint only passes
tensors) V_1 rides along with the hidden states: Megatron's schedules send ONE tensor per stage
and backpropagate only through it, so we send `[s', b, h + w]` = cat(hidden, V_1 reshaped) and
split it again on the other side. Both halves are views of one tensor, so V_1's gradient travels
back to stage 0 with the hidden-state gradient, with no change to Megatron's schedules.

Shapes: V_1 is `[s, b, g, d]` (g = KV heads on this TP rank). Hidden states are `[s, b, h]`, or
`[s/tp, b, h]` under sequence parallelism, where V_1 (already all-gathered by the QKV projection)
is viewed locally as `[s/tp, b, g*d*tp]` (any bijection will do: the same TP rank unpacks it),
so nothing is communicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class V1Slot:
    """V_1 of the microbatch in flight in one model chunk (each virtual chunk has its own)."""

    value: Optional[Tensor] = None
    heads: int = 0  # KV heads per TP rank
    head_dim: int = 0

    def clear(self) -> None:
        self.value = None


def packed_width(config, tp_size: int) -> int:
    """Extra last-dim width V_1 adds to a stage's output tensor."""
    heads = config.num_query_groups // tp_size
    width = heads * config.kv_channels
    return width * tp_size if config.sequence_parallel else width


def pack(hidden: Tensor, v1: Tensor) -> Tensor:
    """cat(hidden [s', b, h], V_1 [s, b, g, d] viewed as [s', b, s*g*d/s']) along the last dim."""
    return torch.cat([hidden, v1.reshape(hidden.shape[0], hidden.shape[1], -1).to(hidden.dtype)], dim=-1)


def unpack(packed: Tensor, hidden_size: int, slot: V1Slot) -> Tensor:
    """Split a packed tensor: returns the hidden states and puts V_1 into `slot`."""
    hidden, flat = packed[..., :hidden_size], packed[..., hidden_size:]
    slot.value = flat.reshape(-1, packed.shape[1], slot.heads, slot.head_dim).contiguous()
    return hidden.contiguous()


def is_packed(hidden: Tensor, hidden_size: int) -> bool:
    return hidden.shape[-1] != hidden_size
