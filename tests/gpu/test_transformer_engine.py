"""Transformer Engine spec (H100 path). Skips cleanly without CUDA + Transformer Engine; a skip
here is not a result. Run on a GPU node: `pytest tests/gpu`."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("transformer_engine")

from megatron_gpu import megatron_gpu  # noqa: E402,F401  (fixture)

from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config  # noqa: E402


def _model(impl, variant, fp8=None):
    from rf_megatron.model import build_model_chunks

    cfg = ModelConfig(num_layers=3, hidden_size=128, num_attention_heads=4, vocab_size=256, seq_length=32,
                      variant=variant)
    parallel = ParallelConfig(transformer_impl=impl, fp8=fp8, params_dtype="bf16" if fp8 else "fp32")
    return cfg, build_model_chunks(cfg, build_transformer_config(cfg, parallel), impl)[0].cuda()


@pytest.mark.parametrize("variant", ["resformer", "svformer"])
def test_te_spec_matches_paper_equations(variant, megatron_gpu):
    from test_paper_math import reference_logits

    cfg, model = _model("transformer_engine", variant)
    sd = {k: v.float().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for k in list(sd):  # TE fuses the norms into the following linear layers
        if k.endswith("mlp.linear_fc1.layer_norm_weight"):
            sd[k.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")] = sd[k]
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        got = model.eval()(tokens.cuda(), torch.arange(32).expand(2, -1).cuda(), None).float().cpu()
    assert (got - reference_logits(cfg, sd, tokens)).abs().max() < 2e-3


def test_fp8_training_step_is_finite(megatron_gpu):
    cfg, model = _model("transformer_engine", "resformer", fp8="hybrid")
    tokens = torch.randint(0, 256, (2, 33)).cuda()
    loss = model(tokens[:, :-1], torch.arange(32).expand(2, -1).cuda(), None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
