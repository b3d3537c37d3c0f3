"""Two ranks land one checkpoint (rf_megatron.checkpoint_dir.land_checkpoint) into ROOT; run_config.yaml gets
--config-bytes bytes, so that on a small file system rank 0 alone fails (its records come after the shards).
Each rank prints `rank R: ok` or `rank R: <exception type> <errno>` and exits 0."""
import argparse
import os
import sys
from pathlib import Path

import torch.distributed as dist

from rf_megatron.checkpoint_dir import land_checkpoint

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("--config-bytes", type=int, default=10)
args = p.parse_args()
dist.init_process_group("gloo")
rank = dist.get_rank()


def write_shards(tmp: Path) -> None:
    (tmp / f"shard_{rank}.bin").write_bytes(os.urandom(1000))


def say(line: str) -> None:
    """One write per line: print() writes the text and the newline apart, and under PYTHONUNBUFFERED the two
    ranks' lines could interleave on the shared pipe ("rank 0: OSError 28rank 1: ...")."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


try:
    land_checkpoint(args.root, 1, write_shards, "x" * args.config_bytes, {"run_id": "test"}, keep_last=2)
    say(f"rank {rank}: ok")
except OSError as exc:
    say(f"rank {rank}: {type(exc).__name__} {exc.errno}")
dist.destroy_process_group()
