"""Convert a Hugging Face folder (Llama, or RFGPT exported by convert_checkpoint_to_hf.py) into an
rf-megatron checkpoint that the trainer resumes from, in any TP / PP / virtual-PP layout.

    python tools/convert_hf_to_checkpoint.py --hf hf/x --output runs/y/checkpoints --tp 2 --pp 2 [--vpp 2] \
        [optim.lr=3e-4 train.train_steps=5000 ...]

Writes `iter_0000000/` (model weights only, step 0, 0 samples consumed, run_config.yaml with the chosen
layout) and `latest`, plus the folder's tokenizer.model. No optimizer state is invented: the trainer resumes a
weights-only checkpoint with a fresh optimizer and LR schedule (Megatron-LM's --finetune).
One CPU process, streamed: the weights are read, mapped and written one layer at a time (memory flat in depth),
with progress every 10 s; Megatron reshards them into the chosen layout when the trainer loads them. Then every
written tensor is read back against the HF weights (`--verify none` skips it).

The run config starts from the exporter's copy of the original one (rf_megatron_run_config.yaml) if
present, else from the defaults; `section.key=value` overrides follow. The saved run config is a
starting point: the LR schedule of a resumed run follows the config it is started with. Then:

    torchrun --nproc-per-node N pretrain/pretrain_resformer.py --config OUT/iter_0000000/run_config.yaml \
        data.paths=[...]            # checkpoint.dir already points at OUT, logging.dir beside it

Exit 2 with one line on bad input.
"""
from __future__ import annotations

import argparse
import sys

from ..hf.cli import HelpWithDefaults, quiet
from . import run_converter


def parse_args(argv):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=HelpWithDefaults)
    p.add_argument("--hf", required=True, help="Hugging Face model folder")
    p.add_argument("--output", required=True, help="checkpoint root to create")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the checkpoint")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--verify", choices=("weights", "none"), default="weights",
                   help="read every written tensor back against the HF weights (one layer at a time)")
    p.add_argument("--ports", help=argparse.SUPPRESS)  # no longer used: the import runs in one process
    p.add_argument("overrides", nargs="*", help="run config overrides, section.key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    from ..hf.import_hf import import_hf, overrides_from_argv
    from ..hf.weights import ConversionError

    if args.ports:
        print("note: --ports is no longer needed (the import runs in one process); ignored", file=sys.stderr)
    return run_converter(lambda: import_hf(args.hf, args.output, tp=args.tp, pp=args.pp, vpp=args.vpp,
                                           overrides=overrides_from_argv(args.overrides), force=args.force,
                                           verify=args.verify == "weights"),
                         args.output, (ConversionError, ValueError))


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
