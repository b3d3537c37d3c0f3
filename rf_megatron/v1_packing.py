"""Carrying V_1 to the layers that need it: one `V1Carrier` per model chunk owns all of it.

Inside one model chunk, layer 1's attention writes V_1 into the carrier and later layers read it.
Between pipeline stages (and through full activation recompute, whose checkpoint only passes
tensors) V_1 rides along with the hidden states: Megatron's schedules send ONE tensor per stage
and backpropagate only through it, so we send `[s', b, h + w]` = cat(hidden, V_1 reshaped) and
split it again on the other side. Both halves are views of one tensor, so V_1's gradient travels
back to stage 0 with the hidden-state gradient, with no change to Megatron's schedules; the carrier
also says how much wider the stage-to-stage tensor is, for every schedule.

Shapes: V_1 is `[s, b, g, d]` (g = KV heads on this TP rank). Hidden states are `[s, b, h]`, or
`[s/tp, b, h]` under sequence parallelism, where V_1 (already all-gathered by the QKV projection)
is viewed locally as `[s/tp, b, g*d*tp]` (any bijection will do: the same TP rank unpacks it),
so nothing is communicated.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor


class V1Carrier:
    """V_1 of the microbatch in flight in one model chunk (each virtual chunk has its own): where it is kept, how
    it rides with the hidden states, and how wide it makes the stage-to-stage tensor."""

    def __init__(self, config, tp_size: int):
        self.value: Optional[Tensor] = None  # [s, b, g, d], set by layer 1's attention (or a received stage input)
        self.heads = config.num_query_groups // tp_size  # KV heads on this TP rank
        self.head_dim = config.kv_channels
        self.hidden_size = config.hidden_size
        self.width = width_of(config, tp_size)
        self._full_recompute = config.recompute_granularity == "full"

    def clear(self) -> None:
        """After every forward: no graph outlives its microbatch, no stale V_1 across interleaved microbatches."""
        self.value = None

    def rides_in_hidden(self, training: bool) -> bool:
        """Under full recompute (training), the block's hidden states carry V_1 packed beside them throughout."""
        return self._full_recompute and training

    def pack(self, hidden: Tensor) -> Tensor:
        """cat(hidden [s', b, h], V_1 [s, b, g, d] viewed as [s', b, s*g*d/s']) along the last dim."""
        flat = self.value.reshape(hidden.shape[0], hidden.shape[1], -1).to(hidden.dtype)
        return torch.cat([hidden, flat], dim=-1)

    def unpack(self, packed: Tensor) -> Tensor:
        """Split a packed tensor: returns the hidden states and keeps V_1."""
        hidden, flat = packed[..., :self.hidden_size], packed[..., self.hidden_size:]
        self.value = flat.reshape(-1, packed.shape[1], self.heads, self.head_dim).contiguous()
        return hidden.contiguous()

    def empty_lane(self, hidden: Tensor) -> Tensor:
        """The first stage's embeddings with a zero V_1 lane (full recompute: layer 1 fills it)."""
        return torch.cat([hidden, hidden.new_zeros(*hidden.shape[:-1], self.width)], dim=-1)

    def widen_p2p(self) -> Callable:
        """1F1B's `adjust_tensor_shapes_fn`: every stage-to-stage tensor is `width` wider (empty shapes, sent
        when 0.19's variable_seq_lengths exchanges them first, stay empty)."""
        def widen(recv_shapes, send_shapes):
            grow = lambda shapes: [tuple(s[:-1]) + (s[-1] + self.width,) if len(s) else s for s in shapes]
            return grow(recv_shapes), grow(send_shapes)

        return widen


def width_of(config, tp_size: int) -> int:
    """Extra last-dim width V_1 adds to a stage's output tensor."""
    width = config.num_query_groups // tp_size * config.kv_channels
    return width * tp_size if config.sequence_parallel else width


def interleaved_schedule_options() -> Dict:
    """TransformerConfig options the interleaved schedule needs to send widened tensors: it hard-codes `[s, b, h]`
    p2p shapes, and variable_seq_lengths makes it exchange the real shapes first (Megatron requires the alltoall
    dispatcher with variable_seq_lengths even for dense models)."""
    return {"variable_seq_lengths": True, "moe_token_dispatcher_type": "alltoall"}
