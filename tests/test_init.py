"""model.init: the Megatron trainer and the DeepSpeed one (our HF model) start from the same weight statistics per
tensor group for each choice; `paper` (the released code's Llama init) has no depth scaling, `megatron` scales the
output projections by 1/sqrt(2L)."""
import math

import pytest
import torch

from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config

pytestmark = pytest.mark.mcore_api  # every Megatron-Core version runs these (.ci/run)

L, STD = 4, 0.02
# tensor group -> name fragments in Megatron's and in the HF state dict (first match wins)
GROUPS = {
    "lambda": ("value_residual",),
    "embedding": ("word_embeddings", "embed_tokens"),
    "qkv": ("linear_qkv", "q_proj", "k_proj", "v_proj"),
    "attention_out": ("linear_proj", "o_proj"),
    "fc1": ("linear_fc1", "gate_proj", "up_proj"),
    "fc2": ("linear_fc2", "down_proj"),
    "output_layer": ("output_layer", "lm_head"),
    "norm": ("norm",),
}


def grouped(module) -> dict:
    """Every parameter, flattened and concatenated per group; a parameter in no group fails the test."""
    parts = {}
    for name, param in module.named_parameters():
        group = next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), None)
        assert group is not None, f"{name}: no tensor group"
        parts.setdefault(group, []).append(param.detach().float().flatten())
    return {g: torch.cat(p) for g, p in parts.items()}


def model(init):
    return ModelConfig(num_layers=L, hidden_size=128, num_attention_heads=4, ffn_hidden_size=352, vocab_size=512,
                       init_method_std=STD, init=init, variant="resformer", lambda_mode="learnable")


@pytest.mark.parametrize("init", ["megatron", "paper"])
def test_both_engines_start_from_the_same_statistics(init, megatron_single_rank):
    from rf_megatron.model import build_model_chunks
    from rf_megatron.engines.deepspeed_model import build_fresh

    cfg = model(init)
    torch.manual_seed(0)
    megatron = grouped(build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), cpu=True))[0])
    hf = grouped(build_fresh(cfg, seed=0))
    assert megatron.keys() == hf.keys() == GROUPS.keys()
    output_std = STD if init == "paper" else STD / math.sqrt(2 * L)
    expected = {"embedding": STD, "qkv": STD, "fc1": STD, "output_layer": STD,
                "attention_out": output_std, "fc2": output_std}
    for group, std in expected.items():
        for engine, values in (("megatron", megatron[group]), ("hf", hf[group])):
            assert float(values.std()) == pytest.approx(std, rel=0.05), f"{engine} {group}"
            assert abs(float(values.mean())) < 0.05 * std, f"{engine} {group}"
        assert megatron[group].numel() == hf[group].numel(), group
    for group in ("norm", "lambda"):  # constants: norms 1, lambdas as value_residual_spec says (0.5 here)
        assert torch.equal(megatron[group], hf[group]), group
    assert torch.all(hf["norm"] == 1) and torch.all(hf["lambda"] == 0.5)


def test_a_bad_init_is_one_line():
    from rf_megatron.config import ConfigError

    with pytest.raises(ConfigError, match=r"^init='llama': choose one of megatron, paper$"):
        build_transformer_config(model("llama"), ParallelConfig(), cpu=True)


def test_a_resumed_run_cannot_change_the_init(tmp_path):
    import dataclasses

    import yaml

    from rf_megatron.checkpoint_dir import check_model_unchanged
    from rf_megatron.config import ConfigError

    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(model("megatron"))}))
    check_model_unchanged(tmp_path, dataclasses.asdict(model("megatron")))
    with pytest.raises(ConfigError, match="model.init 'megatron' -> 'paper'"):
        check_model_unchanged(tmp_path, dataclasses.asdict(model("paper")))
