"""What a run says: once, by rank 0 (every rank computes the same answer), with warnings and errors on stderr."""
from __future__ import annotations

import os
import sys


def is_rank0() -> bool:
    """Rank 0 of the process group, or by the launcher's RANK before the group exists."""
    dist = sys.modules.get("torch.distributed")  # not imported here: the config is checked before torch loads
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def from_rank0(value):
    """Rank 0's `value` on every rank (as it is without a process group): what rank 0 alone looked up on disk."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def say(msg: str) -> None:
    """Print on rank 0; `warning:` / `error:` lines go to stderr."""
    if is_rank0():
        print(msg, file=sys.stderr if msg.startswith(("warning:", "error:")) else sys.stdout, flush=True)
