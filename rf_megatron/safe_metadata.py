"""Opening a checkpoint never runs code.

torch's distributed checkpoint (DCP, Megatron's `torch_dist` format) stores its index, `.metadata`, as a pickle and
loads it with `pickle.load`: a crafted file runs whatever it likes the moment a trainer resumes or a converter opens
the checkpoint, and the sha256 manifest cannot help when the attacker rewrites it too. `install()` makes DCP's
reader admit only what DCP itself writes there (its metadata/planner dataclasses and enums, `torch.Size`, dtypes,
layouts); anything else is refused before it is built, with one line naming it.
"""
from __future__ import annotations

import importlib
import pickle

import torch

DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
           ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
           ("builtins", "frozenset"), ("builtins", "slice")}


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint index that names something DCP never writes there: not loaded, nothing executed."""


def _allowed(module: str, name: str) -> bool:
    if (module, name) in ALLOWED:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    if module in DCP_MODULES:
        return isinstance(getattr(importlib.import_module(module), name, None), type)
    return False


class _DcpUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if not _allowed(module, name):
            raise UnsafeCheckpoint(f"{getattr(self, 'source', 'a checkpoint')}: refusing to unpickle {module}.{name}, "
                                   "which DCP checkpoint metadata never holds (a crafted or foreign file?); "
                                   "nothing from it was run")
        return super().find_class(module, name)


class _RestrictedPickle:
    """Stands in for the `pickle` module inside torch.distributed.checkpoint.filesystem (dump stays pickle's)."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(file, **kwargs):
        unpickler = _DcpUnpickler(file, **kwargs)
        unpickler.source = getattr(file, "name", "a checkpoint")
        return unpickler.load()


def install() -> None:
    """Restrict DCP's metadata loading in this process (idempotent). Loaders call it before opening a checkpoint."""
    from torch.distributed.checkpoint import filesystem

    if not isinstance(filesystem.pickle, _RestrictedPickle):
        filesystem.pickle = _RestrictedPickle()


def check(checkpoint_dir) -> None:
    """Read `checkpoint_dir/.metadata` under the restrictions, before torch DCP opens it (DCP would wrap the refusal
    in a per-rank CheckpointException with a traceback). Raises UnsafeCheckpoint."""
    from pathlib import Path

    path = Path(checkpoint_dir) / ".metadata"
    if path.is_file():
        with open(path, "rb") as f:
            _RestrictedPickle.load(f)
