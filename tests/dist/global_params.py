"""Layout-independent names and full tensors for a model's parameters.

A parameter's *global name* is its name in the TP1 x PP1 model: pipeline stages and virtual
chunks renumber their local `decoder.layers.{i}` by each layer's global `layer_number`. Its *full
tensor* concatenates the TP shards along `partition_dim` (Megatron's fused QKV rows are grouped
per KV group, so contiguous dim-0 shards are whole groups). Tests use this to start every layout
from the same weights and compare gradients (the converters name parameters the same way, rf_megatron/hf/weights.py).
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def named_global_parameters(chunk) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of one unwrapped model chunk."""
    layers = chunk.decoder.layers
    for name, param in chunk.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer_number = layers[int(match.group(1))].layer_number
            name = f"decoder.layers.{layer_number - 1}." + name[match.end():]
        yield name, param


def is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param) -> torch.Size:
    shape = list(param.shape)
    if is_tp_sharded(param):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return torch.Size(shape)


def _is_glu_fc1(name: str, chunk_config) -> bool:
    """SwiGLU's fc1 is [gate; up]: each TP rank holds [gate shard; up shard]."""
    return chunk_config.gated_linear_unit and name.endswith("mlp.linear_fc1.weight")


def shard_of(full: torch.Tensor, param, name: str, config) -> torch.Tensor:
    """This TP rank's shard of a full tensor."""
    if not is_tp_sharded(param):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    if _is_glu_fc1(name, config):
        return torch.cat([half.chunk(tp, dim=0)[rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(tp, dim=param.partition_dim)[rank]


def _all_gather_cat(local: torch.Tensor, dim: int) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def gather_tp(local: torch.Tensor, param, name: str, config) -> torch.Tensor:
    """The full tensor from every TP rank's shard (a collective over the TP group)."""
    local = local.detach()
    if not is_tp_sharded(param):
        return local.clone()
    if _is_glu_fc1(name, config):
        return torch.cat([_all_gather_cat(half, 0) for half in local.chunk(2, dim=0)], dim=0)
    return _all_gather_cat(local, param.partition_dim)


def load_full_weights(chunks, full: Dict[str, torch.Tensor]) -> None:
    """Copy full (global-name) tensors into this rank's shards."""
    with torch.no_grad():
        for chunk in chunks:
            for name, param in named_global_parameters(chunk):
                param.copy_(shard_of(full[name], param, name, chunk.config))
