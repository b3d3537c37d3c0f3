"""A Megatron torch_dist checkpoint read one tensor, or one layer of a stacked tensor, at a time.

Megatron stores `decoder.layers.*` as stacked [num_layers, ...] global tensors, saved as one chunk per layer and
TP rank (the SwiGLU fc1 as two chunks per rank: its gate and up halves); what differs between layers (SVFormer's
QKV, learnable lambdas) has a key per layer, `decoder.layers.<name>.layer<n>` (n 1-based, rf_megatron/attention.py).
`read_layer(i)` reads only layer i's chunks, through torch.distributed.checkpoint's own FileSystemReader (same
file format), so a converter holds one layer in memory, not the model, whatever the TP / PP / VPP layout that
wrote it. No process group, no Megatron.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from .weights import ConversionError

STACKED_PREFIX = "decoder.layers."
NOT_MODEL = ("optimizer.", "rng_state")
_OWN_KEY = re.compile(r"^decoder\.layers\.(.+)\.layer(\d+)$")


class _IntoTensors(LoadPlanner):
    """FileSystemReader.read_data's side of a load: each ReadItem names its destination tensor by key."""

    def __init__(self, destinations: Dict[str, torch.Tensor]):
        self.destinations = destinations

    def set_up_planner(self, *args, **kwargs):  # the plan is built by DistCheckpointTensors.read
        pass

    def create_local_plan(self):
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        raise NotImplementedError

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise ConversionError(f"{read_item.dest_index.fqn}: expected a tensor, found bytes")

    def resolve_tensor(self, read_item):
        dest = self.destinations[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor):
        pass


class DistCheckpointTensors:
    """The model tensors of one `iter_N` directory: shapes from the metadata alone, data one region at a time."""

    def __init__(self, iter_dir):
        from ..safe_checkpoint import install

        install()  # opening a checkpoint never runs code (rf_megatron/safe_checkpoint.py)
        self.path = Path(iter_dir)
        self.reader = FileSystemReader(str(self.path))
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.entries: Dict[str, TensorStorageMetadata] = {
            key: md for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) and not key.startswith(NOT_MODEL)}
        self.stacked, self.own, self.globals = set(), {}, set()  # own: (layer index, name) -> key
        for key in self.entries:
            match = _OWN_KEY.match(key)
            if match:
                self.own[(int(match.group(2)) - 1, match.group(1))] = key
            elif key.startswith(STACKED_PREFIX):
                self.stacked.add(key)
            else:
                self.globals.add(key)

    def num_layers(self) -> int:
        sizes = {self.entries[key].size[0] for key in self.stacked}
        if len(sizes) != 1:
            raise ConversionError(f"{self.path}: stacked layer tensors give {sorted(sizes)} layers")
        return sizes.pop()

    def _layer_sources(self, layer: int) -> Dict[str, Tuple[str, Optional[int]]]:
        """name in the layer (`self_attention.linear_qkv.weight`) -> (checkpoint key, layer index or None)."""
        sources = {key[len(STACKED_PREFIX):]: (key, layer) for key in self.stacked}
        sources.update({name: (key, None) for (i, name), key in self.own.items() if i == layer})
        return sources

    def layer_shapes(self, layer: int) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
        out = {}
        for name, (key, index) in self._layer_sources(layer).items():
            md = self.entries[key]
            out[name] = (md.size[1:] if index is not None else md.size, md.properties.dtype)
        return out

    def global_shapes(self) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
        return {key: (self.entries[key].size, self.entries[key].properties.dtype) for key in self.globals}

    def read_layer(self, layer: int) -> Dict[str, torch.Tensor]:
        """Layer `layer` (0-based) of the model: {name in the layer: tensor}."""
        return {name: self.read(key, index) for name, (key, index) in sorted(self._layer_sources(layer).items())}

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The whole tensor `key`, or layer `layer` of a stacked one; reads only the chunks that hold it."""
        if key not in self.entries:
            raise ConversionError(f"checkpoint {self.path} has no {key}")
        md = self.entries[key]
        stacked = layer is not None
        full = torch.Size([1, *md.size[1:]]) if stacked else md.size
        out = torch.empty(full, dtype=md.properties.dtype)
        items, covered = [], 0
        for chunk in md.chunks:
            storage_offsets, dest_offsets, lengths = [0] * len(full), list(chunk.offsets), list(chunk.sizes)
            if stacked:
                if not chunk.offsets[0] <= layer < chunk.offsets[0] + chunk.sizes[0]:
                    continue
                storage_offsets[0], dest_offsets[0], lengths[0] = layer - chunk.offsets[0], 0, 1
            items.append(ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(key),
                                  dest_offsets=torch.Size(dest_offsets),
                                  storage_index=MetadataIndex(key, torch.Size(chunk.offsets)),
                                  storage_offsets=torch.Size(storage_offsets), lengths=torch.Size(lengths)))
            covered += torch.Size(lengths).numel()
        if covered != out.numel():  # DCP chunks never overlap: anything short of numel is a hole
            where = f"layer {layer} of " if stacked else ""
            raise ConversionError(f"checkpoint {self.path}: the chunks of {where}{key} cover {covered} of "
                                  f"{out.numel()} elements")
        self.reader.read_data(LoadPlan(items), _IntoTensors({key: out})).wait()
        return out[0] if stacked else out
