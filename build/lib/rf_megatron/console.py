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


def say(msg: str) -> None:
    """Print on rank 0; `warning:` / `error:` lines go to stderr."""
    if is_rank0():
        print(msg, file=sys.stderr if msg.startswith(("warning:", "error:")) else sys.stdout, flush=True)
