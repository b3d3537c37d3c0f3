"""Opening a checkpoint never runs code.

Trust model (README "What is guaranteed"): a checkpoint directory is data, not code. Its `manifest.json` (sizes
and sha256 of every file) gives *integrity* — it catches a truncated or flipped file — but not *authenticity*:
whoever can write the checkpoint can rewrite the manifest too. So every pickle inside a checkpoint is read by an
unpickler that can only build plain data:

- torch DCP (Megatron's `torch_dist` format) stores its index, `.metadata`, as a pickle: DCP's reader admits only
  what DCP itself writes there (its metadata/planner dataclasses and enums, `torch.Size`, dtypes, layouts);
- every *bytes* item of a `.distcp` file (Megatron's `ShardedObject`s: `rng_state/*`, `*/_extra_state/*`) is a
  `torch.save` pickle that DCP's planner loads with `weights_only=False`: we load them with `weights_only=True`
  (tensors, containers, numbers) plus the numpy types of the RNG state, in `check` before DCP opens anything
  (one line naming the item and file) and again inside DCP's planner (`install`), for any caller;
- DeepSpeed's `*.pt` files (its engine calls `torch.load(weights_only=False)`): `SafeDeepSpeedCheckpointEngine`
  loads them with `weights_only=True` plus the few DeepSpeed data classes its ZeRO optimizer state holds.

Anything else is refused before it is built, with one line naming it.
"""
from __future__ import annotations

import importlib
import io
import pickle
import re
import warnings
from pathlib import Path

import torch

DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
           ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
           ("builtins", "frozenset"), ("builtins", "slice")}
# Beyond torch's weights_only defaults: numpy's RNG state (rng_state/*), a BytesIO (Transformer Engine's extra
# state in older TE), and the data classes DeepSpeed's ZeRO optimizer state pickles.
OBJECT_GLOBALS = ("numpy:ndarray", "numpy:dtype", "numpy._core.multiarray:_reconstruct",
                  "numpy.core.multiarray:_reconstruct", "io:BytesIO")
DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config:ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler:LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment:fragment_address")


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A pickle in a checkpoint that names something the checkpoint never holds: not loaded, nothing executed."""


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


def _resolve(specs):
    """The importable ones of 'module:name' specs (numpy 1 and 2 name _reconstruct differently), and numpy 2's
    dtype classes (a pickled uint32 array names `numpy.dtypes.UInt32DType`)."""
    import numpy

    found = [getattr(numpy.dtypes, n) for n in dir(getattr(numpy, "dtypes", None)) if n.endswith("DType")]
    for spec in specs:
        module, name = spec.split(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return found


def load_pickled(data, source: str, extra_globals=(), map_location="cpu"):
    """`torch.load` of checkpoint bytes (or a file path) admitting plain data only. Raises UnsafeCheckpoint naming
    `source` and the first thing refused."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with warnings.catch_warnings(), torch.serialization.safe_globals(_resolve(OBJECT_GLOBALS + tuple(extra_globals))):
        warnings.simplefilter("ignore")  # "Detected pickle protocol 4": torch's remark, not the user's problem
        try:
            return torch.load(stream, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+)", str(exc)) or re.search(r"but got <class '([^']+)'>", str(exc))
            what = found.group(1) if found else "it"
            reason = "" if found else f" ({_first_reason(str(exc))})"
            raise UnsafeCheckpoint(f"{source}: refusing to unpickle {what}{reason}, which a checkpoint never holds "
                                   "(a crafted or foreign file?); nothing from it was run") from None


def _first_reason(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    after = [line for i, line in enumerate(lines) if i and "WeightsUnpickler error" in lines[i - 1]]
    return (after or ["not plain data"])[0][:120]


def _guarded_load_bytes(original):
    def load_bytes(self, read_item, value):
        load_pickled(value.getvalue(), f"checkpoint item {read_item.dest_index.fqn}")  # raises if unsafe
        value.seek(0)
        return original(self, read_item, value)  # now only builds what the safe load just admitted

    load_bytes.rf_guarded = True
    return load_bytes


def install() -> None:
    """Restrict DCP's metadata and bytes-item loading in this process (idempotent). Loaders call it before opening
    a checkpoint."""
    from torch.distributed.checkpoint import default_planner, filesystem

    if not isinstance(filesystem.pickle, _RestrictedPickle):
        filesystem.pickle = _RestrictedPickle()
    planner = default_planner.DefaultLoadPlanner
    if not getattr(planner.load_bytes, "rf_guarded", False):
        planner.load_bytes = _guarded_load_bytes(planner.load_bytes)


def check(checkpoint_dir) -> None:
    """Read `.metadata` and every bytes item of a torch_dist checkpoint under the restrictions, before torch DCP
    opens it (DCP would wrap a refusal in a per-rank CheckpointException with a traceback). Raises
    UnsafeCheckpoint. Items are small (RNG and extra states), so reading them twice costs nothing."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file():
        return
    with open(path / ".metadata", "rb") as f:
        metadata = _RestrictedPickle.load(f)
    kinds = getattr(metadata, "state_dict_metadata", {}) or {}
    for index, info in sorted((getattr(metadata, "storage_data", None) or {}).items(), key=lambda kv: kv[0].fqn):
        if not isinstance(kinds.get(index.fqn), BytesStorageMetadata) or getattr(info, "transform_descriptors", None):
            continue  # tensors are raw bytes; transformed items are left to the guarded planner
        file = path / info.relative_path
        if not file.is_file():
            continue  # a missing file is the manifest's and the loader's to report
        with open(file, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) == info.length:
            load_pickled(data, f"{file} (item {index.fqn})")


def safe_deepspeed_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True` (its own calls weights_only=False).
    Built lazily: DeepSpeed is an optional dependency."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeDeepSpeedCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_pickled(str(path), str(path), DEEPSPEED_GLOBALS, map_location=map_location)

    return SafeDeepSpeedCheckpointEngine()
