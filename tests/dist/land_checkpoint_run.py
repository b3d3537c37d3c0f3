"""Two ranks land one checkpoint (rf_megatron.checkpoint_dir.land_checkpoint) into ROOT; run_config.yaml gets
--config-bytes bytes, so that on a small file system rank 0 alone fails (its records come after the shards).
Each rank prints `rank R: ok` or `rank R: <exception type> <errno>` and exits 0."""
import argparse
import os
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


try:
    land_checkpoint(args.root, 1, write_shards, "x" * args.config_bytes, {"run_id": "test"}, keep_last=2)
    print(f"rank {rank}: ok", flush=True)
except OSError as exc:
    print(f"rank {rank}: {type(exc).__name__} {exc.errno}", flush=True)
dist.destroy_process_group()
