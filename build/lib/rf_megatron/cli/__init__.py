"""The commands: `rf-train`, `rf-train-deepspeed`, `rf-convert-to-hf`, `rf-convert-from-hf` (setup.py's console
scripts), also run from a checkout as pretrain/*.py and tools/convert_*.py."""
