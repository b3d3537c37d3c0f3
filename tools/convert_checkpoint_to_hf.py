#!/usr/bin/env python
"""Convert an rf-megatron checkpoint to a Hugging Face folder: `rf-convert-to-hf` when rf-megatron is pip-installed, this script in a checkout (rf_megatron/cli/convert_to_hf.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, uninstalled

from rf_megatron.cli.convert_to_hf import main, parse_args, run  # noqa: E402,F401  (main, parse_args: tests call them)

if __name__ == "__main__":
    run()
