"""Tokens/s of the Megatron engine next to our Hugging Face model trained by a plain PyTorch loop, in one process.

    python bench/throughput.py                                   # tiny shape (CPU: a few seconds)
    python bench/throughput.py --shape resformer_82m             # one GPU (bf16)
    python bench/throughput.py --shape resformer_468m --variants vanilla --compile --compile-layers

Every path trains the same shape on the same token batches (same tokens per optimizer step), and the timed
steps alternate between the paths (the order reversed every round) so that drift in the machine's load hits
all alike; each path reports the median over the timed rounds and the spread (max - min) / median:
- Megatron: the trainer's step (rf_megatron/engines/megatron.py: Megatron DDP, Megatron's mixed-precision AdamW with
  grad clipping, the param scheduler, the loss read back every step), one process (TP1 PP1), once per
  `model.attention_backend` (sdpa, unfused); on a GPU (or with --ablations) also vanilla sdpa with one step option
  changed per row: torch's foreach AdamW instead of the fused one (optim.fused=false), and each other
  parallel.cross_entropy (rf_megatron/cross_entropy.py: Megatron's, Megatron's fused, torch's compiled), so each
  default is kept only where it is measured to help; and vanilla sdpa with every layer under torch.compile
  (parallel.compile_layers, rf_megatron/layer_compile.py; `--compile-layers`: every variant);
- HF: rf_megatron/hf/modeling_rfgpt.py with SDPA attention, fp32 master weights, bf16 autocast on a GPU,
  torch's AdamW (fused on a GPU) with the same hyper-parameters and grad clipping; `--compile` adds the same
  model under torch.compile.
MFU is the model's training FLOPs per token (rf_megatron/flops.py) against the GPU's peak
(rf_megatron/device_peak.py); n/a on the CPU. Peak memory (GPU): after the timed rounds each path runs one
more step with nothing else resident (the paths measured before it are freed), so it is that path's own peak.
Host syncs/step (GPU): one extra step per path under torch.cuda's sync debug mode counts the host-device
synchronisations (Megatron's path: its grad-norm `.item()` and the loss read for train.nan_policy).
On the CPU both engines run under rf_megatron's CPU mode; its figures say only that the bench runs.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

SHAPES = {"tiny": "tiny_cpu", "resformer_82m": "resformer_82m", "resformer_468m": "resformer_468m"}
GLOBAL_BATCH = {"tiny": 16, "resformer_82m": 64, "resformer_468m": 64}  # sequences per optimizer step
VARIANTS = {"vanilla": dict(variant="vanilla"), "identity": dict(variant="resformer", lambda_mode="identity"),
            "svformer": dict(variant="svformer")}
LABELS = {"vanilla": "vanilla", "identity": "ResFormer identity", "svformer": "SVFormer"}
CE_LABELS = {"megatron": "Megatron CE", "megatron_fused": "Megatron fused CE", "compiled": "compiled CE"}
COMPILED_LAYERS = "sdpa, compiled layers"


@dataclass
class Run:
    """One way of training one variant: its step, what it weighs, what it measured."""

    engine: str  # "Megatron" | "HF"
    variant: str
    kernel: str  # the attention: "sdpa" | "unfused" | "sdpa + compile"
    step: Callable[[List[Dict[str, torch.Tensor]]], float]
    release: Callable[[], None]
    flops_per_token: float
    times: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    syncs: Optional[int] = None  # host-device synchronisations in one step (GPU: torch.cuda sync debug mode)
    error: Optional[str] = None

    @property
    def label(self) -> str:
        return f"{self.engine}, {LABELS[self.variant]}, {self.kernel}"


def token_batches(vocab: int, seq: int, micro_batch: int, microbatches: int) -> List[Dict[str, torch.Tensor]]:
    """Host microbatches as the trainer's collate builds them (rf_megatron/data.py)."""
    from rf_megatron.data import causal_mask

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(microbatches):
        t = torch.randint(0, vocab, (micro_batch, seq + 1), generator=g)
        out.append(dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(micro_batch, seq),
                        position_ids=torch.arange(seq).expand(micro_batch, -1), attention_mask=causal_mask(seq)))
    return out


def megatron_path(model_cfg, parallel, optim, variant: str, backend: str, kernel: Optional[str] = None) -> Run:
    """Trainer.train_step (rf_megatron/engines/megatron.py) without its NaN checks: same model, optimizer, scheduler.
    `kernel` labels a row that changes `parallel` / `optim` (the ablations)."""
    import dataclasses

    from rf_megatron.build import build_model, build_optimizer, build_scheduler
    from rf_megatron.flops import training_flops_per_token
    from rf_megatron.engines.megatron import _global_loss, run_global_batch

    cfg = dataclasses.replace(model_cfg, attention_backend=backend)
    state = {}
    state["model"], _ = build_model(cfg, parallel)
    state["optimizer"] = build_optimizer(state["model"], optim, parallel)
    state["scheduler"] = build_scheduler(state["optimizer"], optim, train_steps=10_000)

    def step(microbatches):
        model, optimizer = state["model"], state["optimizer"]
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        loss = _global_loss(run_global_batch(model, microbatches, cfg.seq_length))
        _, grad_norm, _ = optimizer.step()
        float(grad_norm)
        state["scheduler"].step(increment=1)
        return loss

    return Run("Megatron", variant, kernel or backend, step, state.clear, training_flops_per_token(cfg))


def hf_path(model_cfg, optim, variant: str, bf16: bool, compile_: bool) -> Run:
    """A plain PyTorch loop over our HF model: what a user comparing stacks would write (AdamW fused as
    optim.fused says; None: on a GPU)."""
    from rf_megatron.device import current_device, to_device
    from rf_megatron.flops import training_flops_per_token
    from rf_megatron.hf.configuration_rfgpt import RFGPTConfig
    from rf_megatron.hf.modeling_rfgpt import RFGPTForCausalLM
    from rf_megatron.hf.weights import hf_config_kwargs
    from rf_megatron.engines.deepspeed_model import param_groups

    device = current_device()
    config = RFGPTConfig(**{**hf_config_kwargs(model_cfg, {}), "variant": model_cfg.variant,
                            "lambda_mode": model_cfg.lambda_mode})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = RFGPTForCausalLM(config).float().to(device)  # fp32 master weights
    groups = [{"params": g["params"], "weight_decay": optim.weight_decay * g["wd_mult"]} for g in param_groups(model)]
    state = {"model": model, "forward": torch.compile(model) if compile_ else model,
             "optimizer": torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                            eps=optim.adam_eps,
                                            fused=device.type == "cuda" if optim.fused is None else optim.fused)}

    def step(microbatches):
        model, optimizer = state["model"], state["optimizer"]
        total = torch.zeros((), device=device)
        for mb in microbatches:
            b = to_device(mb)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = state["forward"](input_ids=b["tokens"]).logits
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), b["labels"].reshape(-1))
            (loss / len(microbatches)).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # here, not before the next step: no gradients resident between
        return (total / len(microbatches)).item()

    kernel = "sdpa + compile" if compile_ else "sdpa"
    return Run("HF", variant, kernel, step, state.clear, training_flops_per_token(model_cfg))


def timed(path: Run, microbatches, on_gpu: bool) -> float:
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    path.step(microbatches)
    if on_gpu:
        torch.cuda.synchronize()  # kernels are asynchronous: time the work, not its launch
    return time.perf_counter() - start


def measure_peaks(paths: List[Run], microbatches) -> None:
    """One more step per path with the paths before it freed: its peak above what the rest leaves resident."""
    from megatron.core import parallel_state

    for path in paths:
        if path.error:
            continue
        parallel_state.get_global_memory_buffer().buffer.clear()  # the unfused scores buffer counts where used
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        path.step(microbatches)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        path.release()
        parallel_state.get_global_memory_buffer().buffer.clear()
        gc.collect()
        path.peak_bytes = peak - torch.cuda.memory_allocated()


def count_syncs(paths: List[Run], microbatches) -> None:
    """One step per path under torch.cuda's sync debug mode: each host-device synchronisation warns once."""
    import warnings

    for path in paths:
        if path.error:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                path.step(microbatches)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        path.syncs = sum("synchroniz" in str(w.message) for w in caught)


def report(paths: List[Run], tokens_per_step: int, peak_tflops: Optional[float], header: str) -> None:
    def tokens_per_s(p):
        return tokens_per_step / statistics.median(p.times) if p.times else None

    by_key = {(p.engine, p.variant, p.kernel): p for p in paths}
    base = by_key.get(("Megatron", "vanilla", "sdpa"))
    base_tps = tokens_per_s(base) if base else None
    print(header)
    print()
    print("| path | tokens/s (median) | spread | MFU | peak allocated | host syncs/step | vs Megatron vanilla sdpa |")
    print("|---|---|---|---|---|---|---|")
    for p in paths:
        if p.error:
            print(f"| {p.label} | failed: {p.error} | | | | | |")
            continue
        tps = tokens_per_s(p)
        spread = (max(p.times) - min(p.times)) / statistics.median(p.times)
        mfu = f"{100 * tps * p.flops_per_token / (peak_tflops * 1e12):.1f}%" if peak_tflops else "n/a"
        peak = f"{p.peak_bytes / 2 ** 30:.2f} GiB" if p.peak_bytes is not None else "n/a"
        ratio = f"{tps / base_tps:.2f}x" if base_tps else "n/a"
        syncs = "n/a" if p.syncs is None else p.syncs
        print(f"| {p.label} | {tps:,.0f} | {100 * spread:.0f}% | {mfu} | {peak} | {syncs} | {ratio} |")
    print()
    ratios = []
    for variant in VARIANTS:
        sdpa, unfused = by_key.get(("Megatron", variant, "sdpa")), by_key.get(("Megatron", variant, "unfused"))
        compiled = by_key.get(("Megatron", variant, COMPILED_LAYERS))
        hf, hf_compiled = by_key.get(("HF", variant, "sdpa")), by_key.get(("HF", variant, "sdpa + compile"))
        for mine, what_mine, other, what in ((sdpa, "sdpa", unfused, "Megatron unfused"), (sdpa, "sdpa", hf, "HF sdpa"),
                                             (sdpa, "sdpa", hf_compiled, "HF sdpa + compile"),
                                             (compiled, "compiled layers", hf, "HF sdpa"),
                                             (compiled, "compiled layers", hf_compiled, "HF sdpa + compile")):
            if mine and other and not (mine.error or other.error):
                ratios.append(f"Megatron {what_mine} / {what}, {LABELS[variant]}: "
                              f"{tokens_per_s(mine) / tokens_per_s(other):.2f}x")
    print("\n".join(ratios))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="model shape (a preset's model section); default: tiny on the CPU, resformer_82m on a GPU")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--backends", default="sdpa,unfused", help="the Megatron engine's attention backends")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per microbatch (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: 1 on the CPU, 3 on a GPU)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 3 on the CPU, 6 on a GPU)")
    p.add_argument("--compile", action="store_true", help="also the HF model under torch.compile")
    p.add_argument("--compile-layers", action="store_true",
                   help="also the Megatron engine with every layer under torch.compile, for every variant")
    p.add_argument("--no-hf", action="store_true", help="the Megatron engine only")
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=None,
                   help="also vanilla sdpa with one step option changed each: foreach AdamW (not fused), each other "
                        "parallel.cross_entropy, compiled layers (default: on a GPU)")
    args = p.parse_args(argv)

    from rf_megatron.device import on_gpu, select_device, simulated

    select_device()  # a GPU when there is one (RF_MEGATRON_CPU=1: the CPU)
    gpu = on_gpu()
    from rf_megatron.ports import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rf_megatron.build import init_parallel
    from rf_megatron.config import OptimConfig, ParallelConfig, replace
    from rf_megatron.device_peak import peak_tflops
    from rf_megatron.run_config import load_run_config

    shape = args.shape or ("resformer_82m" if gpu else "tiny")
    preset = load_run_config(SHAPES[shape])
    if preset.model.vocab_size is None:  # tiny_cpu takes it from its tokenizer (4,096 pieces), which may not be here
        preset.model.vocab_size = 4096
    micro_batch = args.micro_batch or preset.train.micro_batch_size
    global_batch = args.global_batch or GLOBAL_BATCH[shape]
    if global_batch % micro_batch:
        p.error(f"--global-batch {global_batch} is not a multiple of --micro-batch {micro_batch}")
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    rounds = args.rounds if args.rounds is not None else (6 if gpu else 3)
    bf16 = gpu
    parallel = ParallelConfig(params_dtype="bf16" if bf16 else "fp32")
    init_parallel(parallel)
    optim = OptimConfig()
    microbatches = token_batches(preset.model.vocab_size, preset.model.seq_length, micro_batch,
                                 global_batch // micro_batch)

    from rf_megatron.cross_entropy import resolve

    ce_default = resolve(parallel.cross_entropy, parallel.tensor_parallel, gpu and not simulated())
    # megatron_fused is bf16 only; both it and compiled go through torch.compile, which cannot compile for the
    # simulated GPU's "cuda"
    ce_ablations = [c for c in CE_LABELS if c != ce_default and (c != "megatron_fused" or bf16)
                    and (c == "megatron" or not simulated())]
    paths: List[Run] = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            p.error(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
        model_cfg = replace(preset.model, **{"lambda_mode": "identity", **VARIANTS[variant]})
        for backend in args.backends.split(","):
            paths.append(megatron_path(model_cfg, parallel, optim, variant, backend))
        ablations = (args.ablations if args.ablations is not None else gpu) and variant == "vanilla"
        if (args.compile_layers or ablations) and not simulated():  # no compiler for the simulated GPU's "cuda"
            paths.append(megatron_path(model_cfg, replace(parallel, compile_layers=True), optim, variant, "sdpa",
                                       COMPILED_LAYERS))
        if ablations:
            paths.append(megatron_path(model_cfg, parallel, replace(optim, fused=False), variant, "sdpa",
                                       "sdpa, foreach AdamW"))
            for choice in ce_ablations:
                paths.append(megatron_path(model_cfg, replace(parallel, cross_entropy=choice), optim, variant,
                                           "sdpa", f"sdpa, {CE_LABELS[choice]}"))
        if not args.no_hf:
            paths.append(hf_path(model_cfg, optim, variant, bf16, compile_=False))
            if args.compile:
                paths.append(hf_path(model_cfg, optim, variant, bf16, compile_=True))

    for r in range(warmup + rounds):
        for path in (paths if r % 2 == 0 else paths[::-1]):
            if path.error:
                continue
            try:
                dt = timed(path, microbatches, gpu)
            except Exception as exc:  # e.g. torch.compile without a working compiler: that row says so
                path.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
                continue
            if r >= warmup:
                path.times.append(dt)
    if gpu and not simulated():  # a real GPU (the simulated one has no sync debug mode or memory stats)
        count_syncs(paths, microbatches)
        measure_peaks(paths, microbatches)

    m = preset.model
    device = torch.cuda.get_device_name() if gpu else "CPU"
    header = (f"# {shape}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, FFN "
              f"{m.ffn_hidden_size}, vocab {m.vocab_size}, seq {m.seq_length}; {global_batch} x {m.seq_length} tokens "
              f"per step ({global_batch // micro_batch} microbatches of {micro_batch}), {'bf16' if bf16 else 'fp32'}; "
              f"{device}, torch {torch.__version__}; {warmup} warm-up + {rounds} timed rounds, alternating; Megatron's "
              f"loss: {CE_LABELS[ce_default]} unless a row says otherwise")
    report(paths, global_batch * m.seq_length, peak_tflops(None) if gpu else None, header)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    from rf_megatron.quiet import silence_known_warnings

    silence_known_warnings()  # the warnings a user did not cause (Megatron on a machine without Apex / TE)
    main()
