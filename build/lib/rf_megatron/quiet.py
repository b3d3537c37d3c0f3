"""Warnings a user did not cause, filtered once at our entry points (trainers, converters, tools).

Each entry is a known message from a library we call, with why it is noise for our users. Anything not
listed here still prints: a warning that points at a real problem must reach the user.
"""
from __future__ import annotations

import logging
import os
import warnings

# (message regex, category, when): "always", or "cpu" (noise only without CUDA: on a GPU the missing
# fused kernels are worth knowing about).
KNOWN_NOISE = (
    # Megatron-Core at import, without Apex / Transformer Engine: expected on CPU (docs/architecture.md §5)
    (r"Transformer Engine and Apex are not installed", UserWarning, "cpu"),
    (r"Apex is not installed", UserWarning, "cpu"),
    (r".*[Tt]ransformer[ _-]?[Ee]ngine.* not (installed|available)", UserWarning, "cpu"),
    # Megatron asks for CUDA_DEVICE_MAX_CONNECTIONS=1 for its comm/compute overlap: meaningless on CPU
    (r".*CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, "cpu"),
    # torch / Megatron deprecations inside Megatron-Core itself (not our calls)
    (r".*full scope is deprecated", UserWarning, "always"),
    (r".*torch\.distributed\._shard", UserWarning, "always"),
    (r".*TypedStorage is deprecated", UserWarning, "always"),
    (r".*deprecating ShardedTensor", FutureWarning, "always"),  # Megatron's dist_checkpointing still uses it
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning, "always"),
    # torch DCP when the HF import writes a checkpoint in one process, which is what it means to do
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to save in a single",
     UserWarning, "always"),
    # torch on a CPU-only machine, from Megatron's CUDA-minded code paths our CPU shim redirects
    (r".*CUDA is not available", UserWarning, "cpu"),
    (r".*(pin_memory|pinned memory).*no accelerator", UserWarning, "cpu"),
)
# Loggers that repeat INFO/WARNING lines per rank about the same missing optional packages.
NOISY_LOGGERS = ("megatron.core.utils", "megatron.core.transformer.transformer_config")


def silence_known_warnings() -> None:
    """Install the filters (idempotent) before Megatron-Core / DeepSpeed are imported."""
    cpu = os.environ.get("RF_MEGATRON_CPU") == "1" or not _cuda_available()
    for pattern, category, when in KNOWN_NOISE:
        if when == "always" or cpu:
            warnings.filterwarnings("ignore", message=pattern, category=category)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(megatron|deepspeed|torch)\.")
    if cpu:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
