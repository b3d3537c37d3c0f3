"""Gradient finalisation: Megatron's, plus the value-residual lambdas' reductions.

- A lambda is replicated on every TP rank but each rank only backpropagates through its own
  heads, so its gradient is partial: sum it over the TP group (after Megatron's DP reduction; TP
  peers share one grad-buffer layout, so this is also right for the distributed optimizer).
- learnable_plus keeps a copy of its logits/scale in every model chunk on every pipeline stage:
  sum their gradients over chunks and the PP group *before* the DP reduction (stages have
  different buffer layouts), so every copy takes the same step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads


def _grad(param):
    return param.main_grad if getattr(param, "main_grad", None) is not None else param.grad


def _params(model_chunks, flag):
    return [p for chunk in model_chunks for p in chunk.parameters()
            if p.requires_grad and getattr(p, flag, False) and _grad(p) is not None]


def _sum_tp_replicated(model_chunks) -> None:
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [_grad(p) for p in _params(model_chunks, "value_residual_tp_sum")]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
        for g, synced in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(synced.view_as(g))


def _sum_pp_shared(model_chunks) -> None:
    params = _params(model_chunks, "value_residual_pp_shared")
    if not params:
        return
    for name in sorted({p.value_residual_pp_shared for p in params}):  # "logits", "scale"
        copies = [p for p in params if p.value_residual_pp_shared == name]
        total = torch.stack([_grad(p).reshape(-1).float() for p in copies]).sum(0)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        for p in copies:
            _grad(p).copy_(total.view_as(_grad(p)))


def finalize_model_grads(model_chunks, *args, **kwargs):
    """Drop-in for `config.finalize_model_grads_func`."""
    _sum_pp_shared(model_chunks)
    result = megatron_finalize_model_grads(model_chunks, *args, **kwargs)
    _sum_tp_replicated(model_chunks)
    return result
