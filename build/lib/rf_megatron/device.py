"""Where this process computes: one decision, read by both trainers and every tool that runs a model.

- CUDA usable: `cuda:LOCAL_RANK` and NCCL; parameters are built there, batches, loss statistics and every
  tensor handed to a collective are moved there (what Megatron-LM's `get_model` / `get_batch` do).
- CPU mode (`rf_megatron.cpu_mode`: gloo, CPU tensors) only when asked for (`RF_MEGATRON_CPU=1`, or a tool
  that runs on the CPU by design) or on a machine with no CUDA at all, and then one line says so. A SLURM
  job that asked for GPUs and sees none stops with one error line instead of training on the CPU.
- `RF_MEGATRON_CPU=simulate-gpu`: the GPU code path on a CPU machine, every tensor's device tracked
  (`rf_megatron.simulated_gpu`), so a tensor left on the host fails on a laptop as it would on a GPU.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from .console import say
from .errors import ConfigError

_DEVICE: Optional[torch.device] = None
_SIMULATED = False
MODES = ("", "0", "1", "simulate-gpu")


def gpus_requested() -> str:
    """What SLURM says this job asked for ('' when it asked for no GPU or is not a SLURM job)."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS", "SLURM_JOB_GPUS",
                "SLURM_STEP_GPUS"):
        value = os.environ.get(key, "").strip()
        if value and value not in ("0", "(null)", "N/A"):
            return f"{key}={value}"
    tres = os.environ.get("SLURM_TRES_PER_TASK", "")
    return f"SLURM_TRES_PER_TASK={tres}" if "gpu" in tres else ""




def select_device(*, megatron: bool = True, cpu: bool = False, why_cpu: str = "") -> torch.device:
    """Decide (once per process) and return the compute device; sets up CPU mode when that is the answer.

    `megatron=False` (the DeepSpeed trainer) leaves Megatron's CPU shim off: DeepSpeed has its own CPU
    accelerator. `cpu=True` is a tool that runs on the CPU by design (`why_cpu` says why, printed once)."""
    global _DEVICE, _SIMULATED
    if _DEVICE is not None:
        return _DEVICE
    mode = os.environ.get("RF_MEGATRON_CPU", "").strip()
    if mode not in MODES:
        raise ConfigError(f"RF_MEGATRON_CPU={mode!r}: use 1 (train on the CPU), 0 or unset (use the GPUs), "
                          "or simulate-gpu (the GPU code path on the CPU, with device checks)")
    if mode == "simulate-gpu":
        from . import simulated_gpu

        simulated_gpu.enable(deepspeed=not megatron)
        _SIMULATED = True
        _DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        say(f"simulated GPU: CPU tensors tagged as {_DEVICE} (RF_MEGATRON_CPU=simulate-gpu)")
        return _DEVICE
    if cpu or mode == "1" or not torch.cuda.is_available():
        if not (cpu or mode == "1") and (asked := gpus_requested()):
            raise ConfigError(f"this SLURM job asked for GPUs ({asked}) but CUDA sees none "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, torch "
                              f"{torch.__version__}, built for CUDA {torch.version.cuda}): stopping instead of "
                              "training on the CPU (RF_MEGATRON_CPU=1 trains on the CPU on purpose)")
        if megatron:
            from .cpu_mode import enable_cpu_mode

            enable_cpu_mode(allow_with_cuda=True)
        reason = why_cpu or ("RF_MEGATRON_CPU=1" if mode == "1" else "this machine has no CUDA device")
        say(f"running on the CPU with gloo ({reason})")
        _DEVICE = torch.device("cpu")
        return _DEVICE
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local >= count:
        raise ConfigError(f"LOCAL_RANK={local} but this node shows {count} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                          "start one process per GPU (--nproc-per-node / --ntasks-per-node <= GPUs per node)")
    # Megatron's TP/SP communication overlaps compute only if kernels are queued in issue order
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    torch.cuda.set_device(local)
    _DEVICE = torch.device("cuda", local)
    return _DEVICE


def current_device() -> torch.device:
    """The decided device (the CPU in a process that never decided, e.g. a unit test)."""
    return _DEVICE if _DEVICE is not None else torch.device("cpu")


def on_gpu() -> bool:
    """The GPU code path (a real GPU, or the simulated one)."""
    return current_device().type == "cuda"


def simulated() -> bool:
    return _SIMULATED


def backend() -> str:
    """torch.distributed backend for the decided device (the simulated GPU talks gloo underneath)."""
    return "nccl" if on_gpu() and not _SIMULATED else "gloo"


def init_process_group(**kwargs) -> None:
    """torch.distributed for the decided device: NCCL bound to this GPU (no guessing in barriers), else gloo."""
    import torch.distributed as dist

    if backend() == "nccl":
        kwargs.setdefault("device_id", current_device())
    dist.init_process_group(backend(), **kwargs)


def to_device(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A host batch on the compute device (asynchronous copies from pinned memory where possible)."""
    device = current_device()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
