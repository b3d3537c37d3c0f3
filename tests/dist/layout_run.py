"""Train every model variant a few steps in one parallel layout; dump losses and gradients.

Launched by the tests with torchrun (gloo, CPU mode). `--variants identity@unfused,identity@sdpa` runs a
variant with a given `model.attention_backend` (default: auto); `+fused_adam` after it turns on optim.fused
(`vanilla@sdpa+fused_adam`), `+compile_layers` parallel.compile_layers. Every layout starts from the same full
weights (drawn per global parameter name) and sees the same global batches, so results from
different layouts must agree to float tolerance. Output: one torch file per pipeline rank with
  {variant: {"losses": [...], "grad_norms": [...], "grads": {global name: full first-step grad},
             "params": {global name: full params after the last step}}}
"""
import argparse
import os
import zlib

import torch
import torch.distributed as dist

from rf_megatron.cpu_mode import enable_cpu_mode

VARIANTS = {
    "vanilla": dict(variant="vanilla"),
    "identity": dict(variant="resformer", lambda_mode="identity"),
    "constant": dict(variant="resformer", lambda_mode="constant"),
    "learnable": dict(variant="resformer", lambda_mode="learnable"),
    "learnable_plus": dict(variant="resformer", lambda_mode="learnable_plus"),
    "sparse": dict(variant="resformer", lambda_mode="sparse", sparse_layers=[3, 4]),
    "svformer": dict(variant="svformer"),
    "svformer_gqa": dict(variant="svformer", num_query_groups=2),
}
SEQ, MBS, NMB_GLOBAL, VOCAB = 16, 2, 4, 128


def full_init(name, shape):
    """Deterministic full tensor per global parameter name (layout independent)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if "lambda" in name or "logits" in name or "scale" in name:
        return None  # keep the module's own init (0.5, zeros, ...)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.05 * torch.randn(shape, generator=g)


def batches(step, dp_rank, nmb):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (NMB_GLOBAL, MBS, SEQ + 1), generator=g)
    for m in range(dp_rank * nmb, (dp_rank + 1) * nmb):
        t = tokens[m]
        yield dict(tokens=t[:, :-1], labels=t[:, 1:], position_ids=torch.arange(SEQ).expand(MBS, -1),
                   attention_mask=torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1))


def gather_dist_opt_grads(ddp_model, dp_group):
    """After the reduce-scatter each DP rank holds only its shard: all-gather the buckets."""
    size, rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    for buffer in ddp_model.buffers:
        for bucket in buffer.buckets:
            shards = list(bucket.grad_data.view(size, -1).unbind(0))
            mine = shards[rank].clone()
            dist.all_gather(shards, mine, group=dp_group)


def run_variant(name, args, ps):
    from rf_megatron.build import build_model, build_optimizer
    from rf_megatron.config import ModelConfig, OptimConfig, ParallelConfig
    from rf_megatron.schedule import forward_backward
    from global_params import full_shape, gather_tp, load_full_weights, named_global_parameters

    variant, _, backend = name.partition("@")
    backend, *options = backend.split("+")
    unknown = set(options) - {"fused_adam", "compile_layers"}
    assert not unknown, unknown
    model_cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                            vocab_size=VOCAB, seq_length=SEQ, qk_layernorm=args.qk_layernorm,
                            attention_backend=backend or "auto", **VARIANTS[variant])
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp,
                              virtual_pipeline_parallel=args.vpp, sequence_parallel=args.sp,
                              distributed_optimizer=args.dist_opt, recompute_granularity=args.recompute,
                              compile_layers="compile_layers" in options)

    def same_weights_everywhere(chunks):
        full = {}
        for chunk in chunks:
            for gname, p in named_global_parameters(chunk):
                init = full_init(gname, full_shape(p))
                full[gname] = init if init is not None else p.detach().clone()
        load_full_weights(chunks, full)

    model, config = build_model(model_cfg, parallel, before_ddp=same_weights_everywhere)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, min_lr=0.0, weight_decay=0.0, adam_beta2=0.999,
                                             fused="fused_adam" in options), parallel)

    def forward_step(data_iterator, m):
        b = next(data_iterator)
        out = m(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return out, loss_func

    dp = ps.get_data_parallel_world_size()
    nmb = NMB_GLOBAL // dp
    result = {"losses": [], "grad_norms": [], "grads": {}, "params": {}}
    for step in range(args.steps):
        for m in model:
            m.zero_grad_buffer()
        opt.zero_grad()
        # every virtual chunk reads its own copy of the microbatch stream
        its = [batches(step, ps.get_data_parallel_rank(), nmb) for _ in model]
        data = its if len(model) > 1 else its[0]
        losses = forward_backward(model_chunks=model, forward_step_func=forward_step, data_iterator=data,
                                  num_microbatches=nmb, seq_length=SEQ, micro_batch_size=MBS)
        if step == 0:
            if args.dist_opt:
                for m in model:
                    gather_dist_opt_grads(m, ps.get_data_parallel_group())
            for m in model:
                for gname, p in named_global_parameters(m.module):
                    result["grads"][gname] = gather_tp(p.main_grad, p, gname, config)
        ok, grad_norm, _ = opt.step()
        loss = torch.tensor(0.0)
        if ps.is_pipeline_last_stage():
            loss = torch.stack([x["lm loss"] for x in losses]).mean()
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            loss /= dp
        result["losses"].append(loss.item())
        result["grad_norms"].append(float(grad_norm))
    for m in model:
        for gname, p in named_global_parameters(m.module):
            result["params"][gname] = gather_tp(p.data, p, gname, config)
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--recompute", default=None)
    p.add_argument("--qk-layernorm", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    enable_cpu_mode()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                 virtual_pipeline_model_parallel_size=args.vpp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    results = {name: run_variant(name, args, ps) for name in args.variants.split(",")}
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save(results, os.path.join(args.out, f"pp{ps.get_pipeline_model_parallel_rank()}.pt"))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
