"""parallel.cross_entropy=compiled (auto's choice on a GPU at TP1) on a real GPU: Triton kernels from inductor give
Megatron's loss and logits gradient on the paper's vocabulary in bf16, with a lower peak of memory (no fp32 copy of
the logits kept for the backward). Needs CUDA and Triton: the simulated GPU cannot compile for "cuda"."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from megatron_gpu import megatron_gpu  # noqa: E402,F401  (fixture)

TOKENS, BATCH, VOCAB = 2048, 2, 50304


def loss_grad_peak(fn, logits, labels):
    """(loss, logits gradient, peak bytes above the inputs) of one forward and backward."""
    x = logits.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fn(x, labels)
    loss.mean().backward()
    torch.cuda.synchronize()
    return loss.detach(), x.grad, torch.cuda.max_memory_allocated() - before


def test_compiled_cross_entropy_on_the_gpu_equals_megatrons_with_less_memory(megatron_gpu):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from rf_megatron.cross_entropy import CompiledCrossEntropy

    g = torch.Generator(device=megatron_gpu).manual_seed(0)
    logits = (torch.randn(TOKENS, BATCH, VOCAB, device=megatron_gpu, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (TOKENS, BATCH), device=megatron_gpu, generator=g)
    compiled = CompiledCrossEntropy()
    loss_grad_peak(compiled, logits, labels)  # compile (first call) outside the measurement
    loss, grad, peak = loss_grad_peak(vocab_parallel_cross_entropy, logits, labels)
    c_loss, c_grad, c_peak = loss_grad_peak(compiled, logits, labels)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-4)
    assert c_grad.dtype == grad.dtype == torch.bfloat16
    torch.testing.assert_close(c_grad.float(), grad.float(), rtol=2 ** -7, atol=1e-9)
    print(f"\npeak above the inputs, {TOKENS}x{BATCH}x{VOCAB} bf16 logits: Megatron {peak / 2 ** 20:.0f} MiB, "
          f"compiled {c_peak / 2 ** 20:.0f} MiB")
    assert c_peak < peak
