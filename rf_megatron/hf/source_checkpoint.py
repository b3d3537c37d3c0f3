"""The checkpoint side of an export: find and check a dist checkpoint, read its run config, and (for the
logits check and tests) load it into a TP1 x PP1 Megatron model in this one CPU process.

Finding and checking imports no Megatron, so a wrong path or a damaged checkpoint fails in a second.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import first_line
from .weights import ConversionError, check_exportable


# --------------------------------------------------------------------------------------------------
# Finding and checking a checkpoint (no Megatron import: errors come fast)
# --------------------------------------------------------------------------------------------------
def resolve_checkpoint(path) -> Path:
    """A checkpoint root (follows `latest`) or an `iter_N` directory -> the iter directory, checked
    for completeness."""
    from ..checkpoint_dir import CheckpointError, resolve_iteration

    try:
        it = resolve_iteration(path)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    if it.name.endswith(".tmp"):
        raise ConversionError(f"incomplete checkpoint {it}: a save that never finished (.tmp)")
    for name in ("train_state.json", "run_config.yaml", "metadata.json", ".metadata"):
        if not (it / name).exists():
            raise ConversionError(f"incomplete checkpoint {it}: no {name}")
    return it


def check_shard_files(it: Path) -> None:
    """Every data file named by the torch_dist metadata must exist."""
    from torch.distributed.checkpoint import FileSystemReader

    from ..safe_checkpoint import UnsafeCheckpoint, check, install

    install()  # opening a checkpoint never runs code (rf_megatron/safe_checkpoint.py)
    try:
        metadata = FileSystemReader(str(it)).read_metadata()
        check(it)  # and neither does any object pickled in it
    except UnsafeCheckpoint as exc:
        raise ConversionError(str(exc)) from None
    except Exception as exc:  # a truncated or foreign .metadata
        raise ConversionError(f"incomplete checkpoint {it}: cannot read .metadata ({type(exc).__name__})") from None
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    missing = [f for f in files if not (it / f).exists()]
    if missing:
        raise ConversionError(f"incomplete checkpoint {it}: missing {', '.join(missing[:4])}"
                              + (" ..." if len(missing) > 4 else ""))


def read_run_config(it: Path):
    from ..config import ConfigError
    from ..value_residual_spec import MODES, VARIANTS
    from ..run_config import load_run_config

    try:
        cfg = load_run_config(str(it / "run_config.yaml"))
    except ConfigError as exc:
        raise ConversionError(f"{it}/run_config.yaml: {exc}") from None
    model = cfg.model
    if model.variant not in VARIANTS:
        raise ConversionError(f"unknown variant {model.variant!r} in {it}/run_config.yaml "
                              f"(known: {', '.join(VARIANTS)})")
    if model.variant == "resformer" and model.lambda_mode not in MODES:
        raise ConversionError(f"unknown lambda_mode {model.lambda_mode!r} in {it}/run_config.yaml "
                              f"(known: {', '.join(MODES)})")
    check_exportable(model)
    return cfg


def find_tokenizer(cfg, override: Optional[str]) -> Optional[Path]:
    """--tokenizer, else the run config's; None when neither names one (a weights-only export)."""
    path = override or cfg.data.tokenizer_model
    if not path:
        return None
    if not Path(path).is_file():
        raise ConversionError(f"missing tokenizer: {path} not found (pass --tokenizer PATH to the SentencePiece "
                              "model, or --no-tokenizer for the weights alone)")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Megatron in one CPU process
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def megatron_single_process():
    """CPU mode, a 1-rank gloo group and TP1 x PP1 model-parallel state (reusing what exists). Conversion runs
    on the CPU by design, on any machine: it holds one layer's weights at a time, not a training job's GPUs."""
    import torch.distributed as dist

    from ..device import select_device

    select_device(cpu=True, why_cpu="checkpoint conversion")
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ConversionError("the converter runs in ONE process (found a process group of "
                              f"{dist.get_world_size()}); do not launch it with torchrun")
    from megatron.core import parallel_state, tensor_parallel

    own_mp = not parallel_state.model_parallel_is_initialized()
    if own_mp:
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    elif (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()) != (1, 1):
        raise ConversionError("model parallel state is already initialised with TP/PP > 1")
    try:
        yield
    finally:
        if own_mp:
            parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def load_megatron_model(it: Path, cfg):
    """The TP1 x PP1 model with the checkpoint's weights (call inside megatron_single_process)."""
    from ..checkpointing import load_single_model

    try:
        return load_single_model(it, cfg.model)
    except Exception as exc:
        raise ConversionError(f"cannot load the model from {it}: {first_line(exc, 300)}") from None


def megatron_state(model) -> Dict[str, torch.Tensor]:  # the in-memory mapping, for tests
    return {k: v.detach() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    seq = tokens.shape[1]
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    positions = torch.arange(seq).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, positions, mask).float()
