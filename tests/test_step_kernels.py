"""The optimizer step's kernels (rf_megatron/step_kernels.py).

- Megatron's Python fallbacks (no Apex / Transformer Engine) read every gradient's norm back to the host; ours
  compute the same norm and scale on the device, with no readback (counted as `aten._local_scalar_dense`, the op
  behind `.item()` / `float()`, which on a GPU is a host-device sync).
- torch's fused AdamW, switched on inside Megatron's optimizer (the TP2 x PP2 comparison with the foreach kernel:
  tests/test_attention_backend.py).
The cross-entropy choices: tests/test_cross_entropy.py.
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rf_megatron import step_kernels


class HostReadbacks(TorchDispatchMode):
    """Counts the ops that copy a tensor's value into Python (`.item()`, `float()`, `bool()`)."""

    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.count[str(func)] += 1
        return func(*args, **(kwargs or {}))


def gradients():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for shape in ((64, 32), (32,), (5, 7, 3), (1,), (128, 64))]


def test_foreach_l2_norm_equals_megatrons_fallback_without_reading_back():
    from megatron.core.utils import local_multi_tensor_l2_norm

    from rf_megatron.cpu_mode import enable_cpu_mode

    enable_cpu_mode()  # Megatron's fallback allocates its result on "cuda"
    grads = gradients()
    with HostReadbacks() as theirs:
        want, _ = local_multi_tensor_l2_norm(2048, None, [grads], False)
    with HostReadbacks() as ours:
        got, _ = step_kernels.foreach_l2_norm(2048, None, [grads], False)
    assert sum(theirs.count.values()) >= 1 and not ours.count
    assert got.shape == want.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in grads])).reshape(1))


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_foreach_scale_writes_src_times_scale_across_dtypes(scale):
    src = gradients()
    dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    with HostReadbacks() as readbacks:
        step_kernels.foreach_scale(2048, None, [src, dst], scale)
    assert not readbacks.count
    for s, d in zip(src, dst):
        assert torch.equal(d, (s * scale).to(torch.bfloat16))


def test_foreach_scale_in_place_clips_each_gradient():
    grads = gradients()
    want = [g * 0.5 for g in grads]
    step_kernels.foreach_scale(2048, None, [grads, grads], 0.5)
    assert all(torch.equal(g, w) for g, w in zip(grads, want))


def test_install_replaces_only_megatrons_python_fallbacks():
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    step_kernels.install()
    if clip_grads.multi_tensor_applier is utils.local_multi_tensor_applier:  # no Apex / TE here
        assert clip_grads.l2_norm_impl is step_kernels.foreach_l2_norm
        assert clip_grads.multi_tensor_scale_impl is optimizer.multi_tensor_scale_impl is step_kernels.foreach_scale


def test_fused_adam_takes_the_same_steps_as_foreach_and_switches_back():
    params = [torch.nn.Parameter(t.clone()) for t in gradients()]
    twins = [torch.nn.Parameter(t.clone()) for t in gradients()]
    plain = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    fused = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        if step == 1:  # mid-run, as after a resume: the state's step counters move with the switch
            assert step_kernels.use_fused_adam(fused)
            assert all(g["fused"] for g in fused.param_groups)
        for p, q in zip(params, twins):
            p.grad = q.grad = torch.full_like(p, 0.1 * (step + 1)) + p.detach() * 0.01
        plain.step()
        fused.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert step_kernels.use_fused_adam(fused, False) and not any(g["fused"] for g in fused.param_groups)
    assert all(fused.state[p]["step"].device.type == "cpu" and fused.state[p]["step"].item() == 3 for p in twins)
    fused.step()  # the foreach kernel takes it from there


