"""Transformer Engine spec (H100 path). Skips cleanly without CUDA + Transformer Engine; a skip
here is not a result. Run on a GPU node: `pytest tests/gpu`."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("transformer_engine")

from megatron_gpu import megatron_gpu  # noqa: E402,F401  (fixture)

from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config  # noqa: E402


def _model(impl, variant, fp8=None, dtype=None):
    from rf_megatron.model import build_model_chunks

    cfg = ModelConfig(num_layers=3, hidden_size=128, num_attention_heads=4, vocab_size=256, seq_length=32,
                      variant=variant)
    parallel = ParallelConfig(transformer_impl=impl, fp8=fp8, params_dtype=dtype or ("bf16" if fp8 else "fp32"))
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


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    positions = torch.arange(32).expand(2, -1).cuda()
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    return loss.item(), {n: p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["resformer", "svformer"])
def test_fp8_step_matches_bf16_within_fp8_tolerance(variant, megatron_gpu):
    """The same weights in bf16 and with FP8 (hybrid: E4M3 forward, E5M2 backward) give a loss within 2% and
    gradients pointing the same way (cosine > 0.95 per tensor); FP8's amax history is filled by 3 steps first."""
    cfg, bf16 = _model("transformer_engine", variant, dtype="bf16")
    _, fp8 = _model("transformer_engine", variant, fp8="hybrid")
    fp8.load_state_dict(bf16.state_dict(), strict=False)  # strict=False: FP8 modules add their scale buffers
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0)).cuda()
    for _ in range(3):
        _loss_and_grads(fp8, tokens)
    want_loss, want = _loss_and_grads(bf16, tokens)
    got_loss, got = _loss_and_grads(fp8, tokens)
    assert abs(got_loss - want_loss) <= 0.02 * abs(want_loss), (got_loss, want_loss)
    assert set(got) == set(want)
    worst = min((torch.nn.functional.cosine_similarity(got[n], want[n], dim=0).item(), n) for n in want
                if want[n].norm() > 0)
    assert worst[0] > 0.95, worst
