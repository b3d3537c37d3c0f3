"""Convert an rf-megatron checkpoint (any TP / PP / virtual-PP / DP layout) to a Hugging Face folder.

    python tools/convert_checkpoint_to_hf.py --checkpoint runs/x/checkpoints --output hf/x [--dtype bf16]

--checkpoint is a checkpoint root (its `latest` is used) or one `iter_N` directory. Runs in ONE CPU
process (no torchrun) and streams: one layer in memory at a time, so a 70B checkpoint converts on a login
node (bench/convert_memory.py). vanilla -> native LlamaForCausalLM; resformer / svformer -> RFGPTForCausalLM
(configuration_rfgpt.py + modeling_rfgpt.py next to the weights; load with trust_remote_code=True).
The folder holds config.json, sharded safetensors + model.safetensors.index.json, the tokenizer
(tokenizer.json for AutoTokenizer, plus the SentencePiece tokenizer.model), generation_config.json,
README.md (model card) and the source run config. It is written to a temp folder next to the output
and renamed when complete. --verify auto (the default) checks the HF model's logits against the Megatron
model's (max abs diff <= 1e-4 in fp32) for models up to 1B parameters, and above that reads every written tensor
back against the checkpoint (holding both models would bring back the memory peak). Exit 2 with one line on
bad input.
"""
from __future__ import annotations

import argparse
import sys

from ..hf.cli import HelpWithDefaults, quiet
from . import run_converter


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (uses 'latest') or an iter_N directory")
    p.add_argument("--output", required=True, help="HF folder to create")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the saved weights")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 200MB)")
    p.add_argument("--tokenizer", help="SentencePiece model to use instead of the run config's data.tokenizer_model")
    p.add_argument("--no-tokenizer", dest="with_tokenizer", action="store_false",
                   help="write the weights without a tokenizer")
    p.add_argument("--verify", choices=("auto", "logits", "weights", "none"), default="auto",
                   help="logits: HF vs Megatron logits (loads both models); weights: every written tensor read "
                        "back; auto: logits up to 1B parameters, else weights")
    p.add_argument("--no-verify", dest="verify", action="store_const", const="none", help="same as --verify none")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    from ..hf.weights import ConversionError
    from ..hf.tokenizer import TokenizerExportError

    def convert():
        from ..hf.export import export

        export(args.checkpoint, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
               tokenizer=args.tokenizer, verify=args.verify, force=args.force, with_tokenizer=args.with_tokenizer)

    return run_converter(convert, args.output, (ConversionError, TokenizerExportError))


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
