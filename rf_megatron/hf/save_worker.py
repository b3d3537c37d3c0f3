"""torchrun worker of tools/convert_hf_to_checkpoint.py: build the target layout, load full weights,
save a complete trainer checkpoint (model + a fresh optimizer and scheduler, step 0).

    torchrun --nproc-per-node TP*PP -m rf_megatron.hf.save_worker --weights W.pt --run-config R.yaml --root DIR

Saving through `rf_megatron.checkpointing.save_checkpoint` with a freshly built optimizer (Adam
moments zero, step 0: the same first update as a new optimizer) makes the checkpoint complete, so
the trainer's ordinary resume path loads it without any special case.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


# Megatron (0.16 / 0.19) saves the torch-AdamW per-parameter step only `if step:`, so a step of 0
# is silently dropped and the trainer's load then fails (KeyError: 'step'). 1e-30 is truthy and
# becomes exactly 1.0 at the first update in fp32 (1 + 1e-30 == 1): the same update as a fresh AdamW.
FRESH_STEP = 1e-30


def build_scheduler(optimizer, cfg):
    """The trainer's OptimizerParamScheduler for this run config (Megatron restores these values
    from the checkpoint on resume, so they must be the ones the run will train with)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, t = cfg.optim, cfg.train
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=t.train_steps, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=t.train_steps, wd_incr_style="constant",
        wsd_decay_steps=o.lr_wsd_decay_steps, lr_wsd_decay_style="cosine" if o.lr_decay_style == "WSD" else None,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--run-config", required=True)
    p.add_argument("--root", required=True)
    args = p.parse_args(argv)

    import torch.distributed as dist

    from rf_megatron import distopt_fixes
    from rf_megatron.build import build_model, build_optimizer, init_parallel
    from rf_megatron.checkpointing import save_checkpoint
    from rf_megatron.device import select_device
    from rf_megatron.run_config import load_run_config
    from rf_megatron.state import load_full_weights, named_global_parameters

    select_device(cpu=True, why_cpu="checkpoint conversion")
    cfg = load_run_config(args.run_config)
    init_parallel(cfg.parallel, seed=cfg.train.seed)
    distopt_fixes.apply_if_needed()
    full = torch.load(args.weights, map_location="cpu", weights_only=True, mmap=True)
    if "output_layer.weight" not in full:  # tied embeddings: the last stage's copy of the embedding
        full["output_layer.weight"] = full["embedding.word_embeddings.weight"]

    def load(chunks):
        missing = sorted({n for c in chunks for n, _ in named_global_parameters(c)} - set(full))
        if missing:
            raise KeyError(f"no weights for {', '.join(missing[:5])}")
        load_full_weights(chunks, full)

    model, _ = build_model(cfg.model, cfg.parallel, before_ddp=load)
    optimizer = build_optimizer(model, cfg.optim, cfg.parallel)
    scheduler = build_scheduler(optimizer, cfg)
    distopt_fixes.init_optimizer_state(optimizer, step=FRESH_STEP)
    save_checkpoint(args.root, 0, model, optimizer, scheduler,
                    {"consumed_samples": 0, "distributed_optimizer": cfg.parallel.distributed_optimizer},
                    Path(args.run_config).read_text(), keep_last=0)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        # other ranks may wait in a collective this rank left: report and leave at once (torchrun
        # then tears the job down), as the trainer's entry point does
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(code)
