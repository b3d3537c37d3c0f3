"""Bytes one training step moves, op by op: the Megatron engine's step next to our HF model's plain loop.

    python bench/step_traffic.py                                 # tiny shape (CPU: seconds)
    python bench/step_traffic.py --shape resformer_82m           # the paper's shape, 2 x 2048 tokens (CPU: ~1 min)

A count, not a timing, so it needs no GPU: every aten op of one step (the same paths as bench/throughput.py, fp32
on the CPU, torch's fused AdamW as on a GPU) is seen through a TorchDispatchMode, and the bytes of its tensors are added up (inputs read plus
outputs written; views move nothing; an indexing op moves what it picks or puts, not the tensor it indexes). On a
GPU everything but the matmuls and attention is bound by memory bandwidth, so these bytes are that part's time;
the op count is the number of kernels launched. bf16 on a GPU halves the activations' bytes for both paths; the
loss works in fp32 there too. torch.compile'd code runs eagerly here, so the compiled cross-entropy row counts
torch's eager cross-entropy (inductor's fused kernels move less: they read the logits once each way).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/throughput.py builds the paths
import throughput  # noqa: E402

FLOP_BOUND = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_cudnn_attention_backward"}
MOVES_NOTHING = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "detach", "alias", "slice", "select",
                 "unsqueeze", "squeeze", "as_strided", "split", "split_with_sizes", "unbind", "narrow",
                 "_reshape_alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty"}
PICKS = {"index", "gather", "embedding", "nll_loss_forward", "take"}  # read what they return
PUTS = {"index_put_", "index_put", "_index_put_impl_", "scatter", "scatter_", "scatter_add", "scatter_add_",
        "index_add_", "index_add"}  # write their last tensor argument into place


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Traffic(TorchDispatchMode):
    """Per aten op: calls and bytes of its tensors."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in MOVES_NOTHING:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name in PICKS:
            moved = 2 * nbytes(outs)
        elif name in PUTS:
            moved = 2 * nbytes(ins[-1:])
        else:
            moved = nbytes(ins) + nbytes(outs)
        self.calls[name] += 1
        self.bytes[name] += moved
        return out


def census(path, microbatches) -> Traffic:
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):  # torch.compile'd code runs eagerly (see above), uncompiled
        path.step(microbatches)  # warm: optimizer state, the first step's allocations
        with Traffic() as traffic:
            path.step(microbatches)
    return traffic


def report(label: str, traffic: Traffic, top: int) -> int:
    memory = {op: b for op, b in traffic.bytes.items() if op not in FLOP_BOUND}
    flop = sum(b for op, b in traffic.bytes.items() if op in FLOP_BOUND)
    total = sum(memory.values())
    print(f"\n## {label}: {total / 2 ** 30:.2f} GiB outside matmuls and attention ({flop / 2 ** 30:.2f} GiB in them), "
          f"{sum(traffic.calls.values())} ops\n")
    print("| op | calls | GiB | share |")
    print("|---|---|---|---|")
    for op, b in sorted(memory.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {op} | {traffic.calls[op]} | {b / 2 ** 30:.3f} | {100 * b / total:.1f}% |")
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(throughput.SHAPES), default="tiny")
    p.add_argument("--variant", choices=list(throughput.VARIANTS), default="vanilla")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--top", type=int, default=12, help="ops listed per path")
    args = p.parse_args(argv)

    os.environ.setdefault("RF_MEGATRON_CPU", "1")  # fp32 on the CPU: the count does not need a GPU
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    from rf_megatron.ports import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rf_megatron.build import init_parallel
    from rf_megatron.config import OptimConfig, ParallelConfig, replace
    from rf_megatron.run_config import load_run_config

    preset = load_run_config(throughput.SHAPES[args.shape])
    model_cfg = replace(preset.model, vocab_size=preset.model.vocab_size or 4096,
                        **{"lambda_mode": "identity", **throughput.VARIANTS[args.variant]})
    parallel, optim = ParallelConfig(), OptimConfig(fused=True)  # torch's fused AdamW in both, as on a GPU
    init_parallel(parallel)
    microbatches = throughput.token_batches(model_cfg.vocab_size, model_cfg.seq_length, args.micro_batch,
                                            args.microbatches)
    m = model_cfg
    print(f"# {args.shape}, {throughput.LABELS[args.variant]}: {m.num_layers} layers, hidden {m.hidden_size}, vocab "
          f"{m.vocab_size}, seq {m.seq_length}; one step of {args.microbatches} x {args.micro_batch} sequences, fp32, "
          f"torch {torch.__version__}")
    totals = {}
    for label, make in (
            ("Megatron sdpa, Megatron CE", lambda: throughput.megatron_path(
                model_cfg, replace(parallel, cross_entropy="megatron"), optim, args.variant, "sdpa")),
            ("Megatron sdpa, torch CE (what compiled runs, eagerly)", lambda: throughput.megatron_path(
                model_cfg, replace(parallel, cross_entropy="compiled"), optim, args.variant, "sdpa")),
            ("HF sdpa", lambda: throughput.hf_path(model_cfg, optim, args.variant, bf16=False, compile_=False))):
        path = make()
        totals[label] = report(label, census(path, microbatches), args.top)
        path.release()
    base = totals["HF sdpa"]
    print()
    for label, total in totals.items():
        print(f"{label} / HF sdpa, bytes outside matmuls and attention: {total / base:.2f}x")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    from rf_megatron.quiet import silence_known_warnings

    silence_known_warnings()  # the warnings a user did not cause (Megatron on a machine without Apex / TE)
    main()
