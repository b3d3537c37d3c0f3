"""Transformer layer that lets V_1 ride through Megatron's full activation recompute.

`tensor_parallel.checkpoint` replays a chunk of layers from its *tensor arguments* only, under
no_grad on the first pass. If V_1 lived only in the slot, the chunks after layer 1 would not give
its gradient back. So under full recompute the block's hidden states carry V_1 packed beside them
(rf_megatron.v1_packing); this layer unpacks on entry and re-packs on exit. Without recompute the
hidden states are plain and this layer is Megatron's.
"""
from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer

from .v1_packing import V1Slot, is_packed, pack, unpack


class ValueResidualTransformerLayer(TransformerLayer):
    v1_slot: V1Slot = None  # shared with the attention of this model chunk; attached by the model

    def forward(self, hidden_states, *args, **kwargs):
        packed = is_packed(hidden_states, self.config.hidden_size)
        if packed:
            hidden_states = unpack(hidden_states, self.config.hidden_size, self.v1_slot)
        output, context = super().forward(hidden_states, *args, **kwargs)
        if packed:
            output = pack(output, self.v1_slot.value)
        return output, context
