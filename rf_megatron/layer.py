"""Transformer layer that lets V_1 ride through Megatron's full activation recompute.

`tensor_parallel.checkpoint` replays a chunk of layers from its *tensor arguments* only, under
no_grad on the first pass. If V_1 lived only in the slot, the chunks after layer 1 would not give
its gradient back. So under full recompute the block's hidden states carry V_1 packed beside them
(rf_megatron.v1_packing); this layer unpacks on entry and re-packs on exit. Without recompute the
hidden states are plain and this layer is Megatron's.
"""
from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer

from .v1_packing import V1Carrier


class ValueResidualTransformerLayer(TransformerLayer):
    """`v1`: the model chunk's V1Carrier (its attention writes / reads the same one), handed over by the spec."""

    def __init__(self, *args, v1: V1Carrier, **kwargs):
        super().__init__(*args, **kwargs)
        self.v1 = v1

    def forward(self, hidden_states, *args, **kwargs):
        packed = self.v1.rides_in_hidden(self.training)
        if packed:
            hidden_states = self.v1.unpack(hidden_states)
        output, context = super().forward(hidden_states, *args, **kwargs)
        if packed:
            output = self.v1.pack(output)
        return output, context
