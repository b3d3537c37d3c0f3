"""Every variant's Megatron model on the GPU (the GPU code path: built on the device, Megatron's fusions on)
against the paper's equations in float64 on the CPU (tests/test_paper_math.py), in fp32 and bf16. Skips without
CUDA; a skip here is not a result. Run on a GPU node: `pytest tests/gpu` (or tests/gpu/device_check.sh)."""
import os

import pytest
import torch

# DRY_RUN=1 tests/gpu/device_check.sh runs this on the simulated GPU: the plumbing, not GPU numerics
if not (torch.cuda.is_available() or os.environ.get("RF_MEGATRON_CPU") == "simulate-gpu"):
    pytest.skip("needs CUDA", allow_module_level=True)

from megatron_gpu import megatron_gpu  # noqa: E402,F401  (fixture)
from test_paper_math import CASES, reference_logits  # noqa: E402

from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config  # noqa: E402

SEQ, VOCAB = 64, 256
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}  # relative L2 error of the logits: fp32 arithmetic; bf16 operands


@pytest.fixture(scope="module", params=list(CASES))
def case(request, megatron_gpu):
    """(config, fp32 GPU model with non-trivial norms and lambdas, float64 CPU reference, tokens)."""
    from rf_megatron.model import build_model_chunks

    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                      vocab_size=VOCAB, seq_length=SEQ, **CASES[request.param])
    torch.manual_seed(0)
    model = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig()))[0].to(megatron_gpu)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "lambda" in name or "logits" in name:
                p.copy_(0.5 + torch.rand_like(p))
    tokens = torch.randint(0, VOCAB, (4, SEQ))
    state = {k: v.detach().double().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        want = reference_logits(cfg, state, tokens)
    return cfg, model.eval(), want, tokens


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_logits_match_the_cpu_equations(case, dtype, megatron_gpu):
    from rf_megatron.model import build_model_chunks

    cfg, model, want, tokens = case
    assert all(p.device.type == "cuda" for p in model.parameters())
    if dtype == "bf16":
        fp32_state = model.state_dict()
        model = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(params_dtype="bf16")))[0]
        model.to(megatron_gpu).load_state_dict(fp32_state)
        model.eval()
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    with torch.no_grad():
        got = model(tokens.cuda(), torch.arange(SEQ).expand(len(tokens), -1).cuda(), mask.cuda())
    got = got.double().cpu()
    assert got.shape == want.shape and torch.isfinite(got).all()
    rel = ((got - want).norm() / want.norm()).item()
    print(f"{dtype} relative error {rel:.2e}")
    assert rel < TOLERANCE[dtype], rel
