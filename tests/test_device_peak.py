"""MFU's denominator: the device's own dense peak, or nothing (MFU n/a) where none is known."""
import pytest
import torch

from rf_megatron.device_peak import lookup, peak_tflops


@pytest.mark.parametrize("name, fp8, peak", [
    ("NVIDIA H100 80GB HBM3", False, 989.4),
    ("NVIDIA H100 80GB HBM3", True, 1978.9),
    ("NVIDIA H100 PCIe", False, 756.0),
    ("NVIDIA H200", True, 1978.9),
    ("NVIDIA A100-SXM4-80GB", True, 312.0),  # no FP8 on Ampere: the bf16 peak
    ("NVIDIA L40S", False, 362.1),
    ("Some Future GPU", False, None),
])
def test_peak_is_looked_up_from_the_device_name(name, fp8, peak):
    assert lookup(name, fp8) == peak


def test_configured_peak_wins_and_cpu_has_none():
    assert peak_tflops(500.0) == 500.0
    if not torch.cuda.is_available():
        assert peak_tflops(None) is None
