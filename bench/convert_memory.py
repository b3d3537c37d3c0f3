#!/usr/bin/env python
"""Peak memory of checkpoint conversion at two depths of the same width: streaming keeps it flat.

    python bench/convert_memory.py [--hidden 1024 --layers 6 24 --vocab 32000]

For each depth: a random-weight Llama of that shape (made here), imported into a torch_dist checkpoint
(`tools/convert_hf_to_checkpoint.py`), then exported back (`tools/convert_checkpoint_to_hf.py`, with
`--verify none` and `--verify weights`). Each tool runs in its own process; the table gives its peak RSS and
wall time, the weights' fp32 size, and the deep/shallow ratio of each peak. Both directions hold one layer at a
time (the import writes Megatron's torch_dist chunks straight from the HF shards, no model built), so neither peak
should grow with depth. Each round trip is then checked: the exported tensors equal the original ones.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")


def peak_rss(cmd) -> tuple:
    """(peak RSS in GB, wall s) of `cmd` in a fresh process; raises if it fails."""
    begin = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, *map(str, cmd)], capture_output=True,
                          text=True, cwd=REPO)
    last = (proc.stdout.strip().splitlines() or ["0 1"])[-1].split()
    if proc.returncode or last[-1] != "0":
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    kib = last[0]
    return int(kib) / 2**20, time.monotonic() - begin


def make_hf_model(folder: Path, layers: int, args) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    sys.path.insert(0, str(REPO))
    from rf_megatron.hf.safetensors_io import HFWeights

    x, y = HFWeights(a), HFWeights(b)
    return x.shapes == y.shapes and all(torch.equal(x[name], y[name]) for name in x.shapes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, nargs=2, default=(6, 24), help="the shallow and the deep model")
    p.add_argument("--workdir", help="keep the models here (default: a temp dir, removed)")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for layers in args.layers:
            hf, ckpt = work / f"hf_{layers}", work / f"ckpt_{layers}"
            params = make_hf_model(hf, layers, args)
            print(f"{layers} layers: {params / 1e6:.0f}M parameters ({params * 4 / 1e9:.2f} GB fp32)", flush=True)
            row = {"params": params}
            row["import"] = peak_rss([REPO / "tools" / "convert_hf_to_checkpoint.py", "--hf", hf, "--output", ckpt,
                                      "--force"])
            for verify in ("none", "weights"):
                row[f"export --verify {verify}"] = peak_rss(
                    [REPO / "tools" / "convert_checkpoint_to_hf.py", "--checkpoint", ckpt, "--output",
                     work / f"out_{layers}_{verify}", "--verify", verify, "--no-tokenizer", "--max-shard-size", "1GB",
                     "--force"])
            rows[layers] = row
            row["round trip identical"] = same_tensors(hf, work / f"out_{layers}_none")
            print(f"  round trip HF -> checkpoint -> HF identical: {row['round trip identical']}", flush=True)
    shallow, deep = args.layers
    print(f"\nhidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}; peak RSS GB (wall s)")
    print(f"{'step':24s} {shallow:>3d} layers ({rows[shallow]['params'] / 1e6:.0f}M)   "
          f"{deep:>3d} layers ({rows[deep]['params'] / 1e6:.0f}M)   deep/shallow peak")
    for step in ("import", "export --verify none", "export --verify weights"):
        (a, ta), (b, tb) = rows[shallow][step], rows[deep][step]
        print(f"{step:24s} {a:8.2f} ({ta:5.1f})          {b:8.2f} ({tb:5.1f})          {b / a:5.2f}x")
    print(json.dumps({str(k): v for k, v in rows.items()}))


if __name__ == "__main__":
    main()
