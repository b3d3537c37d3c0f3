#!/usr/bin/env python
"""Train or fine-tune the Hugging Face-format value-residual GPT with DeepSpeed ZeRO: `rf-train-deepspeed` when rf-megatron is pip-installed, this script in a checkout (rf_megatron/cli/train_deepspeed.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, uninstalled

from rf_megatron.cli.train_deepspeed import main, parse_args, run  # noqa: E402,F401  (main, parse_args: tests call them)

if __name__ == "__main__":
    run()
