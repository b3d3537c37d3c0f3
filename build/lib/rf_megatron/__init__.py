"""rf-megatron: value residual learning (ResFormer / SVFormer) on Megatron-Core."""

from .lazy_jit import install as _lazy_megatron_jit

__version__ = "0.1.0"

_lazy_megatron_jit()  # Megatron's torch.compile decorators cost 4.3 s per process at import (rf_megatron/lazy_jit.py)
