"""SVFormer drops the V projection of layers >= 2; lambdas add exactly their scalars."""
import pytest

from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config

L, H, HEADS = 4, 64, 4



pytestmark = pytest.mark.mcore_api  # every Megatron-Core version runs these (.ci/run)

def count(megatron, **kw):
    from rf_megatron.model import build_model_chunks

    cfg = ModelConfig(num_layers=L, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=96,
                      vocab_size=128, **kw)
    model = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), cpu=True))[0]
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("groups", [None, 2])
def test_svformer_has_no_value_projection_after_layer_one(groups, megatron_single_rank):
    kv = (groups or HEADS) * (H // HEADS)
    vanilla = count(megatron_single_rank, variant="vanilla", num_query_groups=groups)
    assert count(megatron_single_rank, variant="svformer", num_query_groups=groups) == vanilla - (L - 1) * kv * H


@pytest.mark.parametrize("mode,extra", [("identity", 0), ("constant", 0), ("sparse", 0),
                                        ("learnable", 2 * (L - 1)),
                                        ("learnable_plus", (L - 1) + (L - 1) + 1)])
def test_resformer_adds_only_its_lambdas(mode, extra, megatron_single_rank):
    vanilla = count(megatron_single_rank, variant="vanilla")
    assert count(megatron_single_rank, variant="resformer", lambda_mode=mode) == vanilla + extra
