"""Checkpoints with Megatron `dist_checkpointing` (torch_dist): model chunks, optimizer (including
the distributed optimizer, fully reshardable), scheduler, RNG and the data position.

Atomic on a shared filesystem: every rank writes into `iter_NNNNNNN.tmp/`; only when all ranks
are done (and `manifest.json`, the files' checksums, is written) does rank 0 rename it to
`iter_NNNNNNN/` and then rewrite `latest` (write + rename). A
crash mid-save leaves a `.tmp` directory that nothing reads (removed at the next save) and the
previous `latest` intact. Sharded keys are layout independent (global layer numbers), so a
checkpoint loads into another TP / PP / virtual-PP / DP layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from .checkpoint_dir import (CheckpointError, land_checkpoint, latest_checkpoint,  # noqa: F401
                             read_train_state)  # (CheckpointError, latest_checkpoint: re-exported)
from .distopt_fixes import init_optimizer_state
from .model import unwrap

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rank0() -> bool:
    return dist.get_rank() == 0


def _layout() -> Dict[str, int]:
    return dict(tp=parallel_state.get_tensor_model_parallel_world_size(),
                pp=parallel_state.get_pipeline_model_parallel_world_size(),
                vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1)


def _rng_object(state) -> ShardedObject:
    tp, pp = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()
    return ShardedObject("rng_state", state, (pp, tp),
                         (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def _set_rng_state(state) -> None:
    from megatron.core import tensor_parallel
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(model: List, optimizer, is_loading: bool, with_rng: bool) -> Dict[str, Any]:
    state = {f"model{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(model)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIM_METADATA)
    if with_rng:
        state["rng_state"] = _rng_object(_rng_state())
    return state


def _start_writer_queue_ignoring_stop_signals() -> None:
    """Megatron's async checkpoint writer keeps a helper process (a multiprocessing Manager) alive
    after the first save. SLURM signals *every* process of a step (scancel, time limit): if that
    helper dies, the very save the signal asked for fails. Start it with SIGTERM/SIGUSR1 ignored;
    the ignore survives its exec, while our own handlers are restored right after."""
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    start = getattr(fa, "get_write_results_queue", None) or getattr(fa, "_get_write_results_queue", None)
    if start is None:
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        start()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def save_checkpoint(root, step: int, model: List, optimizer, scheduler, train_state: Dict[str, Any],
                    run_config_yaml: str, keep_last: int = 2, sharded_strategy=None) -> Path:
    """optimizer=None: a weights-only checkpoint (HF import): no optimizer, scheduler or RNG state; the trainer
    resumes it with a fresh optimizer and schedule, as Megatron-LM's --finetune does. `model`: DDP-wrapped or bare
    chunks; `sharded_strategy`: how the tensors are written (default: Megatron's torch_dist; the HF importer
    streams them, rf_megatron.hf.streaming_save)."""
    weights_only = optimizer is None

    def write_shards(tmp: Path) -> None:
        _start_writer_queue_ignoring_stop_signals()
        state = _sharded_state(model, optimizer, is_loading=False, with_rng=not weights_only)
        if not weights_only:
            state["scheduler"] = scheduler.state_dict()
        dist_checkpointing.save(state, str(tmp), sharded_strategy=sharded_strategy)

    train_state = {**train_state, "layout": _layout(), **({"weights_only": True} if weights_only else {})}
    return land_checkpoint(root, step, write_shards, run_config_yaml, train_state, keep_last)


def load_checkpoint(path, model: List, optimizer, scheduler) -> Dict[str, Any]:
    """Load into the current layout; returns the saved train state (step, consumed samples, ...). A weights-only
    checkpoint loads the model alone: the optimizer and scheduler stay as built (fresh), the optimizer's main
    (fp32) copies re-read from the loaded weights."""
    path = Path(path)
    train_state = read_train_state(path)
    weights_only = bool(train_state.get("weights_only"))
    same_layout = train_state.get("layout") == _layout() and not weights_only
    if not weights_only:
        init_optimizer_state(optimizer)
    state = _sharded_state(model, None if weights_only else optimizer, is_loading=True, with_rng=same_layout)
    if not weights_only:
        state["scheduler"] = None
    from .safe_checkpoint import check, install

    install()  # opening a checkpoint never runs code
    check(path)
    loaded = dist_checkpointing.load(state, str(path))
    for i, m in enumerate(model):
        m.module.load_state_dict(loaded[f"model{i}"])
    if weights_only:
        optimizer.reload_model_params()  # bf16 / distributed optimizer: its fp32 main params were the init's
        return train_state
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return train_state


def load_single_model(iter_dir, model_cfg, cpu: bool = True, strict=None):
    """The TP1 x PP1 fp32 model of one checkpoint iteration, in eval mode, in a process whose model-parallel state is
    TP1 x PP1: what the converters, their logits check and the attention analysis read a checkpoint through (every
    pickle in it restricted, rf_megatron/safe_checkpoint.py; dist_checkpointing casts a bf16 checkpoint on load).
    `cpu=False`: built on this process's device. `strict`: Megatron's StrictHandling (default: its own)."""
    from .config import ParallelConfig, build_transformer_config
    from .device import current_device
    from .model import build_model_chunks
    from .safe_checkpoint import check, install

    model = build_model_chunks(model_cfg, build_transformer_config(model_cfg, ParallelConfig(), cpu=cpu))[0]
    if not cpu:
        model = model.to(current_device())
    install()  # opening a checkpoint never runs code
    check(iter_dir)
    loaded = dist_checkpointing.load({"model0": model.sharded_state_dict()}, str(iter_dir),
                                     **({} if strict is None else {"strict": strict}))
    model.load_state_dict(loaded["model0"])
    return model.eval()
