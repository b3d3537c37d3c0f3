#!/usr/bin/env python
"""Convert a Hugging Face folder into an rf-megatron checkpoint: `rf-convert-from-hf` when rf-megatron is pip-installed, this script in a checkout (rf_megatron/cli/convert_from_hf.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, uninstalled

from rf_megatron.cli.convert_from_hf import main, parse_args, run  # noqa: E402,F401  (main, parse_args: tests call them)

if __name__ == "__main__":
    run()
