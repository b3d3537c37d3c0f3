"""A GPU on a CPU machine, for finding device bugs without one (`RF_MEGATRON_CPU=simulate-gpu`).

Plain CPU mode (`rf_megatron.cpu_mode`) makes `.cuda()` a no-op, so code that forgets to move a tensor
works on a laptop and fails on the cluster. Here tensors still live in host memory, but each one carries
where it *would* live: sending it to "cuda" (`.cuda()`, `.to("cuda:0")`, `device=` an int or "cuda")
makes a device tensor, everything else made from nothing is a host tensor, and results inherit the
device of their inputs. Then, as on a real GPU:
- an op that mixes a device tensor with a host tensor (other than a 0-dim scalar) raises;
- a collective (all_reduce, send, ...) given a host tensor raises, as NCCL would;
- `tensor.device` / `is_cuda` report the simulated device, so code that follows them behaves as on a GPU.
Tensors made inside C++ (autograd's gradients) carry no tag and are checked through what touches them.
Process groups are gloo underneath. (isend/irecv stay unwrapped: P2POp checks their identity; their tensors are
checked in batch_isend_irecv, which is how Megatron's pipeline sends.)
"""
from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

from .cpu_mode import _CudaToCpu, _is_cuda, enable_cpu_mode

TAG = "_rf_on_device"  # True: device tensor, False: host tensor, absent: unknown (made by C++)
ALLOW_MIXED = {"copy_", "__setitem__", "__getitem__", "to", "cuda", "cpu", "set_", "__set__"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "reduce", "send", "recv", "all_to_all_single", "_all_gather_base",
               "_reduce_scatter_base", "gather", "scatter")


class DeviceMismatch(RuntimeError):
    """What CUDA would have raised: a host tensor where a device tensor is needed."""


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                yield item
    elif isinstance(obj, dict):
        for item in obj.values():
            if isinstance(item, torch.Tensor):
                yield item


def tag(t):
    return getattr(t, TAG, None)


def _set_tag(obj, value) -> None:
    for t in _tensors(obj):
        try:
            setattr(t, TAG, value)
        except (AttributeError, RuntimeError):
            pass


def _describe(t) -> str:
    return f"{'cuda' if tag(t) else 'cpu'} tensor {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def _target_of_to(args, kwargs):
    """Where `.to(...)` sends a tensor: True (device), False (host) or None (it keeps its place)."""
    if "device" in kwargs and kwargs["device"] is not None:
        return _is_cuda(kwargs["device"])
    for arg in args[1:]:
        if isinstance(arg, torch.Tensor):
            return tag(arg)
        if isinstance(arg, (torch.device, str)) or (isinstance(arg, int) and not isinstance(arg, bool)):
            return _is_cuda(arg)
    return None


class _SimulatedGpu(_CudaToCpu):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        prop = getattr(getattr(func, "__self__", None), "__name__", None) if name in ("__get__", "__set__") else None
        if prop == "device" and args and tag(args[0]):
            return torch.device("cuda", _local_rank())
        if prop == "is_cuda" and args:
            return bool(tag(args[0]))
        if name == "get_device" and args and tag(args[0]):
            return _local_rank()
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            return self._backward(*args, **kwargs)
        inputs = [t for a in list(args) + list(kwargs.values()) for t in _tensors(a)]
        mixed = None
        if name not in ALLOW_MIXED:
            on_device = [t for t in inputs if tag(t) is True]
            on_host = [t for t in inputs if tag(t) is False and t.dim() > 0]
            if on_device and on_host:
                mixed = f"{_describe(on_device[0])} and {_describe(on_host[0])}"
        if name == "to":
            target = _target_of_to(args, kwargs)
        elif name == "cuda":
            target = True
        elif name in ("cpu", "pin_memory", "numpy"):
            target = False
        elif "device" in kwargs and kwargs["device"] is not None:
            target = _is_cuda(kwargs["device"])
        else:
            target = None
        result = super().__torch_function__(func, types, args, kwargs)
        if mixed and next(_tensors(result), None) is not None:  # math, not a query like is_same_size
            raise DeviceMismatch(f"{name or func}: expected all tensors on one device, got {mixed}")
        if prop == "data" and name == "__set__":  # param.data = x: the parameter now lives where x does
            if tag(args[1]) is not None:
                _set_tag(args[0], tag(args[1]))
            return result
        if target is True and name in ("to", "cuda") and result is args[0] and tag(args[0]) is not True:
            result = result.clone()  # a host -> device copy is a new tensor; the host one stays on the host
        if target is False and name in ("to", "cpu") and result is args[0] and tag(args[0]) is True:
            result = result.clone()
        if target is None:
            tags = {tag(t) for t in inputs}
            target = True if True in tags else False if (False in tags or not inputs) else None
        if target is not None and result is not None and not (name in ("copy_", "__setitem__") or name.endswith("_")
                                                               and args and result is args[0]):
            _set_tag(result, target)
        return result


    def _backward(self, tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None, **_):
        """`backward()` with this mode kept on: torch pops a mode while it handles a call, and autograd's
        Python backward functions (Megatron's TP/SP linears) allocate on "the current device" too."""
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        inputs = () if inputs is None else (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        with self:
            grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False)
            _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph,
                                 inputs, allow_unreachable=True, accumulate_grad=True)


def _check_collective(fn):
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        for arg in list(args) + list(kwargs.values()):
            ops = arg if isinstance(arg, list) and arg and isinstance(arg[0], dist.P2POp) else []
            for t in [op.tensor for op in ops] or list(_tensors(arg)):
                if tag(t) is False:
                    raise DeviceMismatch(f"torch.distributed.{fn.__name__}: NCCL needs GPU tensors, got a "
                                         f"{_describe(t)}")
        return fn(*args, **kwargs)

    return checked


class _Properties:
    name, major, minor, multi_processor_count, total_memory = "Simulated GPU", 9, 0, 132, 80 * 2**30


def _deepspeed_accelerator():
    """DeepSpeed's CPU accelerator (gloo, host kernels) naming the simulated device, so that the engine places
    the model and its buffers on "cuda" and tensors come back tagged as device tensors."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class SimulatedGpuAccelerator(CPU_Accelerator):
        def device_name(self, device_index=None):
            return "cuda" if device_index is None else f"cuda:{device_index}"

        def current_device(self):
            return _local_rank()

        def current_device_name(self):
            return f"cuda:{_local_rank()}"

        def on_accelerator(self, tensor):
            return tag(tensor) is True

        def communication_backend_name(self):
            return "gloo"

    return SimulatedGpuAccelerator()


def enable(deepspeed: bool = False) -> None:
    """Switch the process to the simulated GPU (before Megatron or DeepSpeed build anything). Idempotent.
    `deepspeed`: also hand DeepSpeed an accelerator that speaks of the simulated device."""
    from . import cpu_mode

    if deepspeed:
        from deepspeed.accelerator import set_accelerator

        set_accelerator(_deepspeed_accelerator())
    if isinstance(cpu_mode._MODE, _SimulatedGpu):
        return
    enable_cpu_mode(allow_with_cuda=True, mode=_SimulatedGpu())
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), _local_rank() + 1)
    cuda.current_device = _local_rank
    cuda.set_device = lambda *a, **k: None
    cuda.get_device_name = lambda *a, **k: _Properties.name
    cuda.get_device_properties = lambda *a, **k: _Properties()
    cuda.get_device_capability = lambda *a, **k: (9, 0)
    cuda.is_bf16_supported = lambda *a, **k: True
    for stat in ("max_memory_allocated", "max_memory_reserved", "memory_allocated", "memory_reserved"):
        setattr(cuda, stat, lambda *a, **k: 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _check_collective(getattr(dist, name)))
    dist.batch_isend_irecv = _check_collective(dist.batch_isend_irecv)
    init = dist.init_process_group

    @functools.wraps(init)
    def init_gloo(backend=None, *args, **kwargs):
        return init(backend="gloo" if backend in (None, "nccl", "cuda:nccl") else backend, *args, **kwargs)

    dist.init_process_group = init_gloo
    original_new = torch.nn.Parameter.__new__

    def parameter_new(cls, data=None, requires_grad=True):
        param = original_new(cls, data, requires_grad)
        _set_tag(param, tag(data) if data is not None else False)
        return param

    torch.nn.Parameter.__new__ = staticmethod(parameter_new)
