"""Process start-up cost: every trainer, converter and preflight process imports Megatron-Core, and CI launches
hundreds of them. Megatron's `@jit_fuser` (torch.compile at decoration) is made lazy (rf_megatron/lazy_jit.py)."""
import subprocess
import sys

from conftest import REPO


def _probe_megatron_import():
    probe = ("import sys, rf_megatron, megatron.core, megatron.core.jit as jit\n"
             "from megatron.core.fusions.fused_bias_gelu import bias_gelu\n"
             "from rf_megatron.lazy_jit import lazy_compile\n"
             "print(megatron.core.__version__, jit.jit_fuser is lazy_compile, hasattr(bias_gelu, '__wrapped__'), "
             "'torch._dynamo' in sys.modules, 'torch._inductor.compile_fx' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, *flags = proc.stdout.split()
    return tuple(int(part) for part in version.split(".")[:2]), [flag == "True" for flag in flags]


def test_importing_megatron_after_rf_megatron_makes_its_jit_fuser_lazy():
    version, (lazy, wrapped, dynamo, inductor) = _probe_megatron_import()
    assert lazy and wrapped
    # 0.16.1 compiles only through jit_fuser, so the import leaves the compiler out. 0.19.2 (checked by hand; not in
    # its CI leg, which keeps to Megatron's APIs) also decorates
    # InferenceTopKRouter._compiled_topk_routing with a bare @torch.compile in moe/router.py, which imports
    # TorchDynamo and Inductor whatever we do: the saving is 0.16.1's (import CPU 9.1 s -> 4.8 s; 0.19.2: ~8 s).
    assert dynamo == inductor == (version >= (0, 19))


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
