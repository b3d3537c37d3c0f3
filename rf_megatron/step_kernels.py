"""Megatron's optimizer step without Apex or Transformer Engine, kept on the device (issue #28).

Without Apex/TE, Megatron-Core falls back to `megatron.core.utils.local_multi_tensor_l2_norm`, which turns every
gradient's norm into a Python float (`torch.tensor(list_of_norms)`: one host-device sync per parameter tensor, every
step, before the grad norm's own `.item()`), and to a per-tensor Python loop for scaling and the bf16 model <-> fp32
main copies. `install()` swaps in PyTorch's multi-tensor kernels (`torch._foreach_norm`, `_foreach_mul_`,
`_foreach_copy_`): the same values, no readback. Megatron's one `.item()` of the total norm stays (it is logged,
and clipping is decided from it on the host, as in Megatron-LM).

`use_fused_adam()` runs the torch AdamW Megatron builds in that case as one fused kernel (`fused=True`, torchtitan's
default), where every parameter's device has the kernel. A checkpoint stores the optimizer's flags with its
state, so `Trainer.load` applies it again after a resume.
"""
from __future__ import annotations

from typing import List

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for `amp_C.multi_tensor_l2norm` (and Megatron's local one): (norm as a 1-element fp32 tensor on the
    tensors' device, None)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float), None  # Megatron never asks (it checks for an empty list first)
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))  # accumulated in fp32, as Apex does
    return torch.linalg.vector_norm(norms).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for `amp_C.multi_tensor_scale`: dst = src * scale, tensor by tensor (dtypes may differ)."""
    src, dst = tensor_lists
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install() -> None:
    """Replace Megatron's local (Python-loop) multi-tensor fallbacks; Apex's or TE's kernels are left alone."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale


def torch_adams(optimizer) -> List[torch.optim.Optimizer]:
    """The torch Adam/AdamW instances inside a Megatron optimizer (chained, mixed precision, distributed)."""
    found, todo = [], [optimizer]
    while todo:
        opt = todo.pop()
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            found.append(opt)
        else:
            todo.extend(getattr(opt, "chained_optimizers", None) or [])
            inner = getattr(opt, "optimizer", None)
            if inner is not None and inner is not opt:
                todo.append(inner)
    return found


def use_fused_adam(optimizer, fused: bool = True) -> bool:
    """Switch torch's Adam(W) inside `optimizer` to its fused kernel (or back to the default foreach one) where
    every parameter's device has one; returns whether any was switched. The `step` counters move to where that
    kernel keeps them (the parameter's device / the host). Same update either way up to rounding."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    switched = False
    for opt in torch_adams(optimizer):
        params = [p for group in opt.param_groups for p in group["params"]]
        if fused and not (params and all(p.device.type in devices and torch.is_floating_point(p) for p in params)):
            continue
        if not fused and not any(group.get("fused") for group in opt.param_groups):
            continue  # already torch's default
        for group in opt.param_groups:
            group["foreach"], group["fused"], group["capturable"] = (False, True, False) if fused else (None, False, False)
        for p in params:
            step = opt.state.get(p, {}).get("step")
            if step is not None:
                opt.state[p]["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device if fused else "cpu")
        switched = True
    return switched
