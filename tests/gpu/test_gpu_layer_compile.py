"""parallel.compile_layers on a real GPU: inductor's Triton kernels, with Megatron's GPU fusions on (its fused
bias-SwiGLU is traced into the layer's graph), compute bf16 logits and gradients no further from the fp32 model's
than the eager bf16 layers do, in one graph for every layer after the first and no graph break. Needs CUDA and
Triton: the simulated GPU cannot compile for "cuda" (the CPU twin, fp32 within 1e-5: tests/test_layer_compile.py)."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from megatron_gpu import megatron_gpu  # noqa: E402,F401  (fixture)

from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config  # noqa: E402

SEQ, VOCAB = 256, 512
CASES = {"vanilla": dict(variant="vanilla"), "learnable_plus": dict(variant="resformer", lambda_mode="learnable_plus"),
         "svformer_gqa": dict(variant="svformer", num_query_groups=2)}
GRAPHS = {"vanilla": 1, "learnable_plus": 2, "svformer_gqa": 2}


def model_of(case, dtype, device):
    from rf_megatron.model import build_model_chunks

    cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512, vocab_size=VOCAB,
                      seq_length=SEQ, **CASES[case])
    # the transformer config a compiled run gets (apex's gradient-accumulation fusion off)
    parallel = ParallelConfig(params_dtype=dtype, compile_layers=True)
    return build_model_chunks(cfg, build_transformer_config(cfg, parallel))[0].to(device)


def logits_and_grads(model, device):
    tokens = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device=device).triu(1)
    logits = model(tokens, torch.arange(SEQ, device=device).expand(4, -1), mask)
    logits.float().square().mean().backward()
    result = logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return result


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_layers_on_the_gpu_are_as_close_to_fp32_as_eager_bf16(case, megatron_gpu):
    from torch._dynamo.utils import counters

    from rf_megatron import layer_compile

    model = model_of(case, "bf16", megatron_gpu)
    fp32 = model_of(case, "fp32", megatron_gpu)
    fp32.load_state_dict(model.state_dict())  # the same weights (bf16 values)
    want_logits, want_grads = logits_and_grads(fp32, megatron_gpu)
    eager_logits, eager_grads = logits_and_grads(model, megatron_gpu)
    torch._dynamo.reset()
    counters.clear()
    layer_compile.compile_layers([model])  # in place: the same weights
    logits, grads = logits_and_grads(model, megatron_gpu)
    graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    errors = {"logits": (relative(logits, want_logits), relative(eager_logits, want_logits))}
    errors.update({n: (relative(grads[n], g), relative(eager_grads[n], g)) for n, g in want_grads.items()})
    worse = {n: e for n, e in errors.items() if e[0] > max(2 * e[1], 1e-2)}
    print(f"\n{case}: logits vs fp32 {errors['logits'][0]:.2e} compiled, {errors['logits'][1]:.2e} eager; worst "
          f"gradient {max(e[0] for e in errors.values()):.2e} compiled, {max(e[1] for e in errors.values()):.2e} "
          f"eager; {graphs} graph(s)")
    assert not breaks and graphs == GRAPHS[case], (graphs, breaks)
    assert not worse, worse
