"""Sharded safetensors in the Hugging Face layout: model-0000i-of-0000n.safetensors + index."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Dict, List, Tuple

import torch

INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text) -> int:
    """'5GB', '500MB', '2MiB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match or (match.group(2) or "").upper() not in _UNITS:
        raise ValueError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def natural_key(name: str):
    """Sort key: model.layers.2 before model.layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def save_sharded(tensors: Dict[str, torch.Tensor], out_dir, max_shard_bytes: int) -> List[str]:
    """Write in-memory tensors as plan_shards splits them. Always writes the index (also for a single shard).
    Returns the shard file names."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    shards = plan_shards({n: (t.shape, t.dtype) for n, t in tensors.items()}, max_shard_bytes)
    files = shard_files(len(shards))
    for file, names in zip(files, shards):
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / file), metadata={"format": "pt"})
    write_index(out_dir, files, shards, sum(t.numel() * t.element_size() for t in tensors.values()))
    return files


def shard_files(count: int) -> List[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(out_dir, files: List[str], shards: List[List[str]], total_bytes: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor."""
    weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
    (Path(out_dir) / INDEX).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                                                  indent=2, sort_keys=True) + "\n")


_DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def plan_shards(shapes: Dict[str, Tuple[torch.Size, torch.dtype]], max_shard_bytes: int) -> List[List[str]]:
    """save_sharded's split of tensors into shards, from shapes alone: natural name order, a new shard when the
    next tensor would overflow `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name in sorted(shapes, key=natural_key):
        shape, dtype = shapes[name]
        nbytes = shape.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class StreamingShardWriter:
    """Sharded safetensors written tensor by tensor, in the planned order, never holding a shard in memory.

    A safetensors file is an 8-byte header length, a JSON header with every tensor's dtype, shape and byte range,
    then the bytes: with the shapes known in advance (plan_shards) each header is written first and each tensor
    appended as it arrives. `close()` writes the index."""

    def __init__(self, out_dir, shapes: Dict[str, Tuple[torch.Size, torch.dtype]], max_shard_bytes: int):
        self.out_dir, self.shapes = Path(out_dir), shapes
        self.shards = plan_shards(shapes, max_shard_bytes)
        self.files = shard_files(len(self.shards))
        self.order = [name for shard in self.shards for name in shard]
        self.shard_of = {name: i for i, shard in enumerate(self.shards) for name in shard}
        self.written = 0
        self.handle = None

    def _open(self, shard: int) -> None:
        header, offset = {}, 0
        for name in self.shards[shard]:
            shape, dtype = self.shapes[name]
            nbytes = shape.numel() * dtype.itemsize
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.handle = open(self.out_dir / self.files[shard], "wb")
        self.handle.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the plan (its name, shape and dtype must match)."""
        expected = self.order[self.written]
        if name != expected or tuple(tensor.shape) != tuple(self.shapes[name][0]) or tensor.dtype != self.shapes[name][1]:
            raise ValueError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} out of plan: expected {expected} "
                             f"{tuple(self.shapes[expected][0])} {self.shapes[expected][1]}")
        shard = self.shards[self.shard_of[name]]
        if name == shard[0]:
            self._open(self.shard_of[name])
        self.handle.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
        self.written += 1
        if name == shard[-1]:
            self.handle.close()
            self.handle = None

    def close(self) -> List[str]:
        if self.written != len(self.order):
            raise ValueError(f"{len(self.order) - self.written} planned tensors never written, "
                             f"from {self.order[self.written]}")
        write_index(self.out_dir, self.files, self.shards,
                    sum(shape.numel() * dtype.itemsize for shape, dtype in self.shapes.values()))
        return self.files


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class HFWeights:
    """The tensors of an HF folder (sharded with an index, or one model.safetensors), read one at a time: names,
    shapes and byte ranges come from the safetensors headers, `weights[name]` reads that tensor's bytes alone.
    Plain reads, not mmap: a mapping's touched pages stay resident, so reading a whole folder through one would
    grow the process by the folder's size."""

    def __init__(self, folder):
        folder = Path(folder)
        if (folder / INDEX).exists():
            files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{folder}: no {INDEX} or model.safetensors")
        self.entries: Dict[str, Tuple[Path, int, int, torch.dtype]] = {}  # name -> (file, start, end, dtype)
        self.shapes: Dict[str, torch.Size] = {}
        for file in files:
            path = folder / file
            if not path.exists():
                raise FileNotFoundError(f"{folder}: {file} is listed in {INDEX} but missing")
            size = path.stat().st_size
            try:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(length)) if 8 + length <= size else None
            except (struct.error, ValueError):
                header = None
            if not isinstance(header, dict):
                raise ValueError(f"{path}: not a readable safetensors file (damaged or truncated header)")
            end_of_data = 8 + length + max([i["data_offsets"][1] for k, i in header.items() if k != "__metadata__"],
                                           default=0)
            if size < end_of_data:
                raise ValueError(f"{path}: truncated ({size} bytes, its header describes {end_of_data})")
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: {name} has dtype {info['dtype']}, which the converter does not read")
                begin, end = info["data_offsets"]
                self.entries[name] = (path, 8 + length + begin, 8 + length + end, _DTYPES[info["dtype"]])
                self.shapes[name] = torch.Size(info["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        path, begin, end, dtype = self.entries[name]
        if end == begin:
            return torch.empty(self.shapes[name], dtype=dtype)
        data = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(begin)
            if f.readinto(data) != len(data):
                raise ValueError(f"{path}: {name} is cut short (a truncated file?)")
        return torch.frombuffer(data, dtype=dtype).reshape(self.shapes[name])

    def meta(self) -> Dict[str, torch.Tensor]:
        """Every tensor as a meta tensor of its shape (float32): mapping these checks names and shapes for free."""
        return {name: torch.empty(shape, device="meta") for name, shape in self.shapes.items()}


def load_hf_weights(folder) -> Dict[str, torch.Tensor]:
    """All tensors of an HF folder: sharded (index) or a single model.safetensors."""
    weights = HFWeights(folder)
    return {name: weights[name] for name in weights.shapes}
