"""torchrun worker of tools/convert_hf_to_checkpoint.py: build the target layout, load full weights,
save a weights-only trainer checkpoint (step 0).

    torchrun --nproc-per-node TP*PP -m rf_megatron.hf.save_worker --weights W.pt --run-config R.yaml --root DIR

No optimizer or scheduler state is invented (zero Adam moments would be 2x the weights on disk for nothing):
`rf_megatron.checkpointing` marks the checkpoint weights-only and the trainer resumes it with a fresh optimizer
and LR schedule, Megatron-LM's --finetune semantics.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--run-config", required=True)
    p.add_argument("--root", required=True)
    args = p.parse_args(argv)

    import torch.distributed as dist

    from rf_megatron import distopt_fixes
    from rf_megatron.build import build_model, init_parallel
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
    save_checkpoint(args.root, 0, model, None, None, {"consumed_samples": 0}, Path(args.run_config).read_text(),
                    keep_last=0)
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
