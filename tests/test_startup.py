"""Process start-up cost: every trainer, converter and preflight process imports Megatron-Core, and CI launches
hundreds of them. Megatron's `@jit_fuser` (torch.compile at decoration) is made lazy (rf_megatron/lazy_jit.py)."""
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.mcore_api
def test_importing_megatron_after_rf_megatron_leaves_the_compiler_unimported():
    probe = ("import sys, rf_megatron, megatron.core, megatron.core.jit as jit\n"
             "from megatron.core.fusions.fused_bias_gelu import bias_gelu\n"
             "from rf_megatron.lazy_jit import lazy_compile\n"
             "print(jit.jit_fuser is lazy_compile, 'torch._dynamo' in sys.modules, "
             "'torch._inductor.compile_fx' in sys.modules, hasattr(bias_gelu, '__wrapped__'))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "False", "False", "True"]


def test_a_lazily_compiled_function_compiles_once_at_its_first_call_with_its_options():
    import torch

    from rf_megatron.lazy_jit import lazy_compile

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @lazy_compile(backend=counting_backend, dynamic=False)
    def bias_tanh(x, bias):
        return torch.tanh(x + bias)

    x, b = torch.randn(4, 8), torch.randn(8)
    assert graphs == []  # decorating compiles nothing
    assert torch.equal(bias_tanh(x, b), torch.tanh(x + b))
    assert len(graphs) == 1
    assert torch.equal(bias_tanh(x, b), torch.tanh(x + b)) and len(graphs) == 1  # compiled once
    assert bias_tanh.__name__ == "bias_tanh"
