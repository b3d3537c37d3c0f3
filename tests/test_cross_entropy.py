"""The loss parallel.cross_entropy chooses (rf_megatron/cross_entropy.py), against Megatron's
vocab_parallel_cross_entropy on one TP rank:
- compiled (torch's cross-entropy under torch.compile; inductor's C++ backend on the CPU): the same loss and logits
  gradient, fp32 and bf16 logits, on its own and as the loss of a Megatron model (vanilla and ResFormer), in
  training and evaluation;
- megatron_fused (Megatron's native kernel): the same loss, its gradient rounded to bf16, hence bf16 only;
- auto: compiled only on a real GPU at TP1; a compiler that fails is said once and Megatron's loss used,
  while an explicit `compiled` stops with the compiler's error;
- choices that cannot work are refused in one line.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from rf_megatron.config import ConfigError, ModelConfig, ParallelConfig
from rf_megatron.cross_entropy import CompiledCrossEntropy, resolve, token_cross_entropy

pytestmark = pytest.mark.mcore_api  # the loss hooks into GPTModel.compute_language_model_loss: every version


def logits_and_labels(dtype=torch.float32, shape=(16, 2), vocab=300):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype)
    return logits, torch.randint(0, vocab, shape, generator=g)


def loss_and_grad(fn, logits, labels):
    x = logits.clone().requires_grad_()
    loss = fn(x, labels)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()  # unequal weights per token
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_and_gradient_equal_megatrons(megatron_single_rank, dtype):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, labels = logits_and_labels(dtype)
    loss, grad = loss_and_grad(vocab_parallel_cross_entropy, logits, labels)
    compiled_loss, compiled_grad = loss_and_grad(CompiledCrossEntropy(), logits, labels)
    assert compiled_loss.dtype == loss.dtype == torch.float32 and compiled_grad.dtype == grad.dtype == dtype
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # bf16 gradients: both rounded from fp32, 8 significant bits
    torch.testing.assert_close(compiled_grad.float(), grad.float(), rtol=tol, atol=1e-7)
    torch.testing.assert_close(token_cross_entropy(logits, labels), loss, rtol=1e-6, atol=1e-5)


def train_and_eval(parallel: ParallelConfig, variant: str):
    """One Megatron model (TP1 PP1): the per-token training loss and every parameter's gradient, then the
    evaluation loss under no_grad."""
    from rf_megatron.build import build_model
    from rf_megatron.model import unwrap

    torch.manual_seed(0)
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=256,
                            seq_length=16, variant=variant, lambda_mode="learnable")
    (model,), _ = build_model(model_cfg, parallel)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 17), generator=g)
    args = (tokens[:, :-1], torch.arange(16).expand(2, -1), None)
    loss = model(*args, labels=tokens[:, 1:])
    loss.sum().backward()
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        eval_loss = model(*args, labels=tokens[:, 1:])
    return type(unwrap(model)).__name__, loss.detach(), grads, eval_loss


@pytest.mark.parametrize("variant", ["vanilla", "resformer"])
def test_a_megatron_model_trains_and_evaluates_with_the_compiled_loss(megatron_single_rank, variant):
    name, loss, grads, eval_loss = train_and_eval(ParallelConfig(cross_entropy="megatron"), variant)
    _, c_loss, c_grads, c_eval_loss = train_and_eval(ParallelConfig(cross_entropy="compiled"), variant)
    assert name == {"vanilla": "GPTModelWithLossChoice", "resformer": "ValueResidualGPTModel"}[variant]
    assert loss.shape == (2, 16) and c_loss.shape == (2, 16)
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_eval_loss, eval_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == c_grads.keys()
    for n in grads:
        torch.testing.assert_close(c_grads[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_the_fallback_under_auto_is_megatrons_loss(megatron_single_rank):
    """What a model built with cross_entropy=auto on a GPU falls back to when the compiler fails."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from rf_megatron.config import build_transformer_config
    from rf_megatron.model import build_model_chunks

    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=300,
                            seq_length=16, variant="vanilla")
    (chunk,) = build_model_chunks(model_cfg, build_transformer_config(model_cfg, ParallelConfig(), cpu=True),
                                  cross_entropy="compiled", compile_fallback=True)
    logits, labels = logits_and_labels()
    expected = vocab_parallel_cross_entropy(logits.clone(), labels)  # it overwrites fp32 logits with their softmax
    assert torch.equal(chunk.compiled_loss._fallback(logits, labels), expected)


def test_megatron_fused_gives_megatrons_loss_and_a_bf16_rounded_gradient(megatron_single_rank):
    """Megatron's fused kernel, run eagerly (torch.compile off: the math, not the compiler), against its
    vocab_parallel_cross_entropy on one TP rank: equal losses; the logits gradient equal up to bf16 rounding."""
    import torch._dynamo
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, labels = logits_and_labels()
    group = megatron_single_rank.get_tensor_model_parallel_group()
    with torch._dynamo.config.patch(disable=True):
        loss, grad = loss_and_grad(vocab_parallel_cross_entropy, logits, labels)
        fused_loss, fused_grad = loss_and_grad(lambda x, t: fused_vocab_parallel_cross_entropy(x, t, group),
                                               logits, labels)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused_grad, fused_grad.to(torch.bfloat16).float())  # every element a bf16 value
    assert not torch.equal(grad, grad.to(torch.bfloat16).float())
    torch.testing.assert_close(fused_grad, grad, rtol=2 ** -8, atol=1e-12)  # bf16: 8 significant bits


def test_auto_is_compiled_only_on_a_real_gpu_at_one_tensor_parallel_rank():
    assert resolve("auto", tensor_parallel=1, real_gpu=True) == "compiled"
    assert resolve("auto", tensor_parallel=2, real_gpu=True) == "megatron"
    assert resolve("auto", tensor_parallel=1, real_gpu=False) == "megatron"  # CPU, and the simulated GPU
    assert resolve("megatron_fused", tensor_parallel=2, real_gpu=True) == "megatron_fused"


@pytest.mark.parametrize("parallel, line", [
    (ParallelConfig(cross_entropy="fused"),
     "cross_entropy='fused': choose one of auto, megatron, megatron_fused, compiled"),
    (ParallelConfig(cross_entropy="megatron_fused"), "cross_entropy=megatron_fused needs params_dtype=bf16"),
    (ParallelConfig(cross_entropy="compiled", tensor_parallel=2), "cross_entropy=compiled needs tensor_parallel=1"),
])
def test_a_choice_that_cannot_work_is_one_line(parallel, line):
    with pytest.raises(ConfigError) as info:
        parallel.validate()
    assert str(info.value).startswith(line) and "\n" not in str(info.value)
    ParallelConfig(cross_entropy="megatron_fused", params_dtype="bf16", tensor_parallel=2).validate()


FAILING_COMPILER = """
import torch
from rf_megatron.cross_entropy import CompiledCrossEntropy, token_cross_entropy
logits = torch.randn(8, 2, 50, requires_grad=True)
labels = torch.randint(0, 50, (8, 2))
loss = CompiledCrossEntropy(fallback=token_cross_entropy if {fallback} else None)
for _ in range(2):
    torch.testing.assert_close(loss(logits, labels), token_cross_entropy(logits, labels))
print("trained on")
"""


@pytest.mark.parametrize("fallback", [True, False])
def test_a_compiler_that_fails_is_said_once_under_auto_and_stops_an_explicit_choice(tmp_path, fallback):
    """A real compiler failure: inductor's C++ compiler is /bin/false, with an empty compile cache."""
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", FAILING_COMPILER.format(fallback=fallback)], env=env,
                         capture_output=True, text=True, timeout=300)
    warnings = [line for line in run.stdout.splitlines() + run.stderr.splitlines() if line.startswith("warning:")]
    if fallback:
        assert run.returncode == 0 and "trained on" in run.stdout, run.stderr[-2000:]
        assert len(warnings) == 1 and "torch.compile of the cross-entropy failed" in warnings[0]
        assert "No working C++ compiler" in warnings[0]
    else:
        assert run.returncode != 0 and "trained on" not in run.stdout
        assert "InvalidCxxCompiler" in run.stderr and not warnings
