"""Run Megatron-Core on a CPU-only torch with the gloo backend.

Megatron-Core hard-codes CUDA in many places (p2p buffers, grad buffers, RNG tracker,
schedules' token counters, checkpoint saver). `enable_cpu_mode()` redirects those to the CPU so a
real TP x PP x DP job runs on a laptop or a CI box. It is never switched on implicitly: call it
(or set ``RF_MEGATRON_CPU=1`` for our entry points; `rf_megatron.device` decides) before building the model.
"""
from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_MODE: "_CudaToCpu | None" = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device='cuda' / int devices to CPU; .cuda() and .to('cuda') become no-ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs:
            # Megatron asserts x.type() == 'torch.cuda.FloatTensor' in a few places.
            t = func(*args)
            if t.startswith("torch.") and not t.startswith("torch.cuda."):
                t = "torch.cuda." + t[len("torch."):]
            return t
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for torch.cuda.Stream: CPU ops are synchronous, so every method is a no-op."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def cpu_mode_enabled() -> bool:
    return _MODE is not None


def enable_cpu_mode(allow_with_cuda: bool = False, mode: "_CudaToCpu | None" = None) -> None:
    """Make Megatron-Core use the CPU. Idempotent. Refuses on a CUDA machine unless told.
    `mode`: a stricter _CudaToCpu (rf_megatron.simulated_gpu's)."""
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available() and not allow_with_cuda:
        raise RuntimeError("enable_cpu_mode() called on a machine with CUDA; pass allow_with_cuda=True "
                           "if you really want to train on the CPU")
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()

    from megatron.core.tensor_parallel import random as mrandom

    # The "cuda" RNG tracker states are CPU generator states here.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    _MODE = mode or _CudaToCpu()
    _MODE.__enter__()


