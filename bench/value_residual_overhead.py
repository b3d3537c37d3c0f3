"""Step time of ResFormer and SVFormer relative to vanilla, same config and layout, one process tree.

    python bench/value_residual_overhead.py                       # 1 process (TP1 PP1), CPU
    python bench/value_residual_overhead.py --layers 8 --hidden 512 --heads 8 --seq 2048 --micro-batch 8 \
        --dtype bf16 --vocab 50304                                    # one GPU, the resformer_82m shape
    torchrun --nproc-per-node 2 bench/value_residual_overhead.py --tp 2

Builds the three models side by side and alternates timed training steps between them (so drift
in machine load hits all three alike); reports the median step time of each variant relative to
vanilla, plus the extra pipeline bytes per microbatch that value residual sends between stages.
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameters (bf16 on a GPU)")
    p.add_argument("--vocab", type=int, default=1024)
    args = p.parse_args()

    from rf_megatron.device import on_gpu, select_device, to_device

    select_device()  # a GPU when there is one (RF_MEGATRON_CPU=1: the CPU)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from megatron.core import parallel_state as ps

    from rf_megatron.build import build_model, build_optimizer, init_parallel
    from rf_megatron.config import ModelConfig, OptimConfig, ParallelConfig
    from rf_megatron.schedule import forward_backward
    from rf_megatron.v1_packing import width_of

    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, params_dtype=args.dtype)
    init_parallel(parallel)
    vocab = args.vocab
    variants = {"vanilla": dict(variant="vanilla"), "resformer": dict(variant="resformer"),
                "svformer": dict(variant="svformer")}
    runs = {}
    for name, kw in variants.items():
        cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                          num_query_groups=args.kv_heads, vocab_size=vocab, seq_length=args.seq, **kw)
        model, config = build_model(cfg, parallel)
        runs[name] = (model, build_optimizer(model, OptimConfig(lr=1e-4), parallel), config)

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.micro_batch, args.seq + 1), generator=g)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:],
                 position_ids=torch.arange(args.seq).expand(args.micro_batch, -1),
                 attention_mask=torch.ones(1, 1, args.seq, args.seq, dtype=torch.bool).triu(1))
    batch = to_device(batch)

    def forward_step(it, m):
        b = next(it)
        out = m(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
        return out, lambda o: (o.float().mean(), {})

    def step(name):
        model, opt, _ = runs[name]
        for m in model:
            m.zero_grad_buffer()
        opt.zero_grad()
        data = iter([batch] * args.microbatches)
        dist.barrier()
        t = time.perf_counter()
        forward_backward(model_chunks=model, forward_step_func=forward_step, data_iterator=data,
                         num_microbatches=args.microbatches, seq_length=args.seq, micro_batch_size=args.micro_batch)
        opt.step()
        if on_gpu():
            torch.cuda.synchronize()  # kernels are asynchronous: time the work, not its launch
        dist.barrier()
        return time.perf_counter() - t

    times = {name: [] for name in runs}
    for r in range(args.warmup + args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate to cancel drift
        for name in order:
            dt = step(name)
            if r >= args.warmup:
                times[name].append(dt)
    if dist.get_rank() == 0:
        base = statistics.median(times["vanilla"])
        print(f"# {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads or args.heads} KV, {args.dtype}, "
              f"seq {args.seq}, micro-batch {args.micro_batch} x {args.microbatches}, TP{args.tp} PP{args.pp}, "
              f"{args.rounds} alternating rounds; vanilla median {base * 1e3:.1f} ms/step")
        for name in ("resformer", "svformer"):
            print(f"{name} {statistics.median(times[name]) / base:.3f}x")
        config = runs["resformer"][2]
        width = width_of(config, ps.get_tensor_model_parallel_world_size())
        print(f"pipeline bytes per microbatch: value residual {1 + width / config.hidden_size:.3f}x vanilla "
              f"(+kv/h = {config.num_query_groups * config.kv_channels}/{config.hidden_size})")
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    from rf_megatron.quiet import silence_known_warnings

    silence_known_warnings()  # the warnings a user did not cause (Megatron on a machine without Apex / TE)
    main()
