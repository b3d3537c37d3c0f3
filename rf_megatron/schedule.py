"""Megatron's pipeline schedules, with the stage-to-stage tensor widened for V_1.

1F1B (`forward_backward_pipelining_without_interleaving`) takes `adjust_tensor_shapes_fn`; the
interleaved schedule refuses it and hard-codes `[s, b, hidden]`, so value-residual configs with
virtual stages set `variable_seq_lengths=True` (rf_megatron.config) and the schedule exchanges
the real shapes first. No Megatron internals are patched.
"""
from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from .model import ValueResidualGPTModel, unwrap


def forward_backward(*, model_chunks, forward_step_func, data_iterator, num_microbatches, seq_length,
                     micro_batch_size, forward_only=False):
    """Run one global batch's forward (and backward) over all microbatches; returns Megatron's
    list of per-microbatch loss dicts (on the last stage)."""
    func = get_forward_backward_func()
    kwargs = {}
    config = unwrap(model_chunks[0]).config
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    first = unwrap(model_chunks[0])
    if pipelined and not config.virtual_pipeline_model_parallel_size and isinstance(first, ValueResidualGPTModel):
        kwargs["adjust_tensor_shapes_fn"] = first.v1.widen_p2p()  # interleaved: config's variable_seq_lengths
    return func(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **kwargs,
    )
