"""Peak dense tensor-core FLOP/s per device, for MFU (model FLOPs utilisation).

Looked up from the device name (torch.cuda.get_device_name), like torchtitan does; `logging.peak_tflops`
overrides it. No figure on CPU or an unknown device: MFU is then reported as n/a, never against a made-up peak.
Values are the vendors' dense (no sparsity) datasheet numbers in TFLOP/s.
"""
from __future__ import annotations

from typing import Optional

# (substring of the device name, bf16/fp16 dense, fp8 dense or None); the first match wins (most specific first)
PEAKS = (
    ("H200", 989.4, 1978.9),  # also GH200
    ("H100 NVL", 835.0, 1670.0),
    ("H100 PCIe", 756.0, 1513.0),
    ("H100", 989.4, 1978.9),  # SXM
    ("B200", 2250.0, 4500.0),
    ("A100", 312.0, None),
    ("L40S", 362.1, 733.0),
    ("L4", 121.0, 242.5),
    ("A10G", 70.0, None),
    ("A10", 125.0, None),
    ("V100", 125.0, None),
)


def lookup(device_name: str, fp8: bool = False) -> Optional[float]:
    for key, bf16, fp8_peak in PEAKS:
        if key in device_name:
            return fp8_peak if fp8 and fp8_peak else bf16
    return None


def peak_tflops(configured: Optional[float], fp8: bool = False) -> Optional[float]:
    """The MFU denominator per device: the configured value, else the current CUDA device's, else None."""
    if configured:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    return lookup(torch.cuda.get_device_name(), fp8)
