"""torch.compile of every transformer layer (`parallel.compile_layers`), as torchtitan compiles each block.

Each layer is compiled in place (`nn.Module.compile`: the same module, parameters and checkpoint keys), so
Megatron's DDP hooks, the optimizer and dist_checkpointing see the model they always see. Layers built alike
share one graph (layer 1, which publishes V_1, has its own; so do sparse's plain layers). Three things would break
that, and are fixed for eager runs too:
- Megatron's `RowParallelLinear` passes `tp_group=None` to its matmul, which then warns (a DeprecationWarning on
  rank 0, every call) and looks up the default group: a graph break in every layer. `RowParallelLinearWithGroup`
  passes its own group (the spec swaps it in).
- value-residual attention branches on a flag set at construction (`publishes_v1`), not on `layer_number`,
  which dynamo would specialise on: one graph per layer;
- learnable_plus picks its layer's share of the model-wide softmax with an index tensor, not an int
  (rf_megatron/value_residual.py), for the same reason.
"""
from __future__ import annotations

from typing import List

from megatron.core.tensor_parallel import RowParallelLinear


class RowParallelLinearWithGroup(RowParallelLinear):
    """Megatron's `RowParallelLinear`, handing its own TP group to the matmul instead of None."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group", self.tp_group) is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


# graphs per layer kind (layer 1; the mixing layers; sparse's plain ones) x (training; full recompute's no-grad first
# pass; evaluation): up to 9, where torch's default of 8 would leave the rest eager with a warning
RECOMPILE_LIMIT = 16


def compile_layers(chunks: List) -> None:
    """Compile every transformer layer of these (unwrapped) model chunks in place. Static shapes: a run has one
    microbatch shape (a dynamic graph, which torch makes after a shape change, would serve training from then on)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            layer.compile(dynamic=False)
