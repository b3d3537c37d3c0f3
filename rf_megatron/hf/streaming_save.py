"""A Megatron torch_dist checkpoint written one tensor at a time, with no weights in memory: the importer's writer
(`dist_tensors.py` is the reader).

The TP1 x PP1 model is built on the meta device (no memory); its `sharded_state_dict` gives Megatron's own keys,
global shapes, dtypes and chunks (a stacked `decoder.layers.*` tensor one chunk per layer, SwiGLU's fc1 two, the
`_extra_state` objects), and `dist_checkpointing.save` writes common.pt and metadata.json as for any checkpoint.
Only the sharded part is ours: `StreamingSaveStrategy` gives torch.distributed.checkpoint's FileSystemWriter a
plan whose data is made when the writer asks for it (`resolve_data`, chunk by chunk in plan order, i.e. layer by
layer) from a source of full TP1 tensors by global name. The working set is what the source holds (the HF
importer: one layer). Megatron loads torch_dist checkpoints into any layout by global offsets, so this one
chunking serves every TP / PP / virtual-PP layout.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, StorageMeta, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from .weights import ConversionError

PROGRESS_EVERY_S = 10.0


def build_meta_model(model_cfg, params_dtype: str):
    """The TP1 x PP1 model on the meta device: its sharded_state_dict describes the checkpoint, its parameters
    take no memory (call inside `source_checkpoint.megatron_single_process`)."""
    from ..config import ParallelConfig, build_transformer_config
    from ..model import build_model_chunks

    config = build_transformer_config(model_cfg, ParallelConfig(params_dtype=params_dtype), cpu=True)
    with torch.device("meta"):
        return build_model_chunks(model_cfg, config)[0]


@dataclass(frozen=True)
class _Chunk:
    name: str                  # the parameter's global name (its TP1 x PP1 name)
    offsets: Tuple[int, ...]   # where the chunk starts inside the full parameter
    shape: torch.Size         # the chunk inside the parameter
    stored: torch.Size        # the same, with the stacked layer axis (size 1) where the key has one
    dtype: torch.dtype


def _leaves(state, name: str = "") -> Iterator[Tuple[str, object]]:
    """(state-dict name, ShardedTensor | ShardedObject): the name of a list's items is the list's."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _leaves(value, key)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _leaves(value, name)
    else:
        yield name, state


class _Writer(FileSystemWriter):
    def storage_meta(self) -> Optional[StorageMeta]:
        """The checkpoint id as a str, as Megatron writes it (FileSystemWriter's is a Path, which
        rf_megatron.safe_checkpoint refuses to unpickle: DCP metadata holds DCP's own types only)."""
        meta = super().storage_meta()
        return meta if meta is None else StorageMeta(checkpoint_id=str(meta.checkpoint_id), save_id=meta.save_id)


class _StreamingPlanner(DefaultSavePlanner):
    """A fixed plan; each chunk's data is made when the storage writer asks for it."""

    def __init__(self, items: List[WriteItem], chunks: Dict[MetadataIndex, _Chunk], objects: Dict[str, bytes],
                 tensor_of: Callable[[str], torch.Tensor], log):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items, self.chunks, self.objects, self.tensor_of, self.log = items, chunks, objects, tensor_of, log
        self.done = self.done_bytes = 0
        self.begin = self.last_report = time.monotonic()

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.objects[write_item.index.fqn])
        chunk = self.chunks[write_item.index]
        tensor = self.tensor_of(chunk.name)
        for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.shape)):
            tensor = tensor.narrow(dim, start, length)
        tensor = tensor.to(chunk.dtype).reshape(chunk.stored).contiguous()
        self._progress(tensor.numel() * tensor.element_size())
        return tensor

    def _progress(self, nbytes: int) -> None:
        self.done += 1
        self.done_bytes += nbytes
        now = time.monotonic()
        if now - self.last_report >= PROGRESS_EVERY_S or self.done == len(self.chunks):
            self.last_report, elapsed = now, max(now - self.begin, 1e-9)
            self.log(f"  {self.done}/{len(self.chunks)} chunks, {self.done_bytes / 1e9:.2f} GB "
                     f"({self.done / elapsed:.0f} chunks/s, {self.done_bytes / 1e9 / elapsed:.2f} GB/s)")


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist version 1, the format Megatron's loader reads, written from `source`: `source.shapes` holds
    {global name: full shape} (checked against the model before anything is written), `source.tensor(name)` the
    full tensor. One process, TP1 x PP1 chunks. A subclass of Megatron's own torch_dist strategy with its `save`
    replaced: Megatron >= 0.19 accepts no other kind (and then also hands the common state over as a
    ShardedObject, `common_state`, instead of writing common.pt itself)."""

    def __init__(self, source, log=print):
        super().__init__("torch_dist", 1)
        self.source, self.log = source, log

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        items, chunks, objects, wrong = [], {}, {}, []
        for name, sharded in _leaves(sharded_state_dict):
            if not is_main_replica(sharded.replica_id):
                continue  # e.g. a tied output layer: the embedding's chunk holds it
            if isinstance(sharded, ShardedObject):
                buffer = io.BytesIO()
                torch.save([sharded.data], buffer)  # as Megatron's torch_dist strategy packs objects
                objects[sharded.unique_key] = buffer.getvalue()
                items.append(WriteItem(index=MetadataIndex(sharded.unique_key), type=WriteItemType.BYTE_IO))
                continue
            if not isinstance(sharded, ShardedTensor) or sharded.flattened_range is not None:
                raise TypeError(f"{name}: cannot stream {type(sharded).__name__} (flattened: optimizer state?)")
            full = tuple(sharded.global_shape[sharded.prepend_axis_num:])  # TP1: the global tensor is the parameter
            if name not in self.source.shapes:
                raise ConversionError(f"HF weights give no tensor for {name}")
            if tuple(self.source.shapes[name]) != full:
                wrong.append(f"{name} {tuple(self.source.shapes[name])} (the model has {full})")
            index = MetadataIndex(sharded.key, torch.Size(sharded.global_offset))
            stored = torch.Size([1] * sharded.prepend_axis_num + list(sharded.local_shape))
            chunks[index] = _Chunk(name, tuple(sharded.global_offset[sharded.prepend_axis_num:]),
                                   torch.Size(sharded.local_shape), stored, sharded.dtype)
            items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=index.offset, sizes=stored),
                properties=TensorProperties(dtype=sharded.dtype), size=torch.Size(sharded.global_shape))))
        if wrong:
            raise ConversionError(f"HF tensors of the wrong shape for config.json's model: {'; '.join(wrong[:3])}")
        planner = _StreamingPlanner(items, chunks, objects, self.source.tensor, self.log)
        dcp_save({}, storage_writer=_Writer(str(checkpoint_dir), single_file_per_rank=True, thread_count=1),
                 planner=planner, no_dist=True)
