#!/usr/bin/env python
"""Pretrain a value-residual (or vanilla) GPT with Megatron-Core: `rf-train` when rf-megatron is pip-installed, this script in a checkout (rf_megatron/cli/train.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, uninstalled

from rf_megatron.cli.train import main, run  # noqa: E402,F401  (main: tests call it)

if __name__ == "__main__":
    run()
