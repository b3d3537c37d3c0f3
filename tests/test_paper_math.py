"""The model computes the paper's equations: Megatron logits == a plain-torch Llama-style
ResFormer / SVFormer written here from arXiv 2410.17897 (same weights, fp32)."""
import math

import pytest
import torch
import torch.nn.functional as F

from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config

SEQ, VOCAB = 12, 96



pytestmark = pytest.mark.mcore_api  # every Megatron-Core version runs these (.ci/run)

def rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, base=10000.0):
    """x: [b, heads, s, d]; rotate-half RoPE on the whole head dim."""
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def split_qkv(w, heads, groups, d, has_v):
    """Megatron's fused rows are grouped per KV group: [q (heads/groups), k, v] for each group."""
    per_group = heads // groups + (2 if has_v else 1)
    w = w.view(groups, per_group, d, -1)
    q = w[:, : heads // groups].reshape(heads * d, -1)
    k = w[:, heads // groups].reshape(groups * d, -1)
    v = w[:, heads // groups + 1].reshape(groups * d, -1) if has_v else None
    return q, k, v


def lambdas(cfg, sd, n):
    """(lambda1, lambda2) of layer n (1-based), or None for plain attention."""
    if cfg.variant != "resformer":
        return None
    chosen = cfg.sparse_layers if cfg.sparse_layers is not None else range(cfg.num_layers // 2 + 1, cfg.num_layers + 1)
    if cfg.lambda_mode == "sparse" and n not in chosen:  # the paper's default: the last half
        return None
    prefix = f"decoder.layers.{n - 1}.self_attention.value_lambdas."
    return {
        "identity": lambda: (0.5, 0.5),
        "sparse": lambda: (0.5, 0.5),
        "constant": lambda: (cfg.lambda_constant, 1.0),
        "learnable": lambda: tuple(sd[prefix + "value_residual_lambdas"]),
        "learnable_plus": lambda: (
            sd["value_residual_plus.value_residual_scale"][0]
            * torch.softmax(sd["value_residual_plus.value_residual_logits"], 0)[n - 2],
            sd[prefix + "value_residual_lambda2"][0]),
    }[cfg.lambda_mode]()


def reference_logits(cfg: ModelConfig, sd, tokens):
    """Llama decoder with value residual: V'_n = l1 V_1 + l2 V_n (ResFormer) or V_1 (SVFormer)."""
    nh, ng, d = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
    b, s = tokens.shape
    x = sd["embedding.word_embeddings.weight"][tokens]
    v1 = None
    for n in range(1, cfg.num_layers + 1):
        p = f"decoder.layers.{n - 1}."
        hid = rms_norm(x, sd[p + "self_attention.linear_qkv.layer_norm_weight"]
                       if p + "self_attention.linear_qkv.layer_norm_weight" in sd else sd[p + "input_layernorm.weight"])
        has_v = cfg.variant != "svformer" or n == 1
        wq, wk, wv = split_qkv(sd[p + "self_attention.linear_qkv.weight"], nh, ng, d, has_v)
        q = (hid @ wq.T).view(b, s, nh, d).transpose(1, 2)
        k = (hid @ wk.T).view(b, s, ng, d).transpose(1, 2)
        v = (hid @ wv.T).view(b, s, ng, d).transpose(1, 2) if has_v else None
        if n == 1:
            v1 = v
        elif cfg.variant == "svformer":
            v = v1
        elif (lam := lambdas(cfg, sd, n)) is not None:
            v = lam[0] * v1 + lam[1] * v
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // ng, 1), v.repeat_interleave(nh // ng, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, nh * d)
        x = x + o @ sd[p + "self_attention.linear_proj.weight"].T
        hid = rms_norm(x, sd[p + "pre_mlp_layernorm.weight"])
        gate, up = (hid @ sd[p + "mlp.linear_fc1.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.linear_fc2.weight"].T
    x = rms_norm(x, sd["decoder.final_layernorm.weight"])
    return x @ sd["output_layer.weight"].T


CASES = {
    "vanilla": dict(variant="vanilla"),
    "identity": dict(variant="resformer", lambda_mode="identity"),
    "constant": dict(variant="resformer", lambda_mode="constant", lambda_constant=1.7),
    "learnable": dict(variant="resformer", lambda_mode="learnable"),
    "learnable_plus": dict(variant="resformer", lambda_mode="learnable_plus"),
    "sparse": dict(variant="resformer", lambda_mode="sparse", sparse_layers=[3]),
    "svformer": dict(variant="svformer"),
    "svformer_gqa": dict(variant="svformer", num_query_groups=2),
    "identity_gqa": dict(variant="resformer", lambda_mode="identity", num_query_groups=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_logits_match_plain_torch_equations(case, megatron_single_rank):
    from rf_megatron.model import build_model_chunks

    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                      vocab_size=VOCAB, seq_length=SEQ, **CASES[case])
    torch.manual_seed(0)
    model = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), cpu=True))[0]
    with torch.no_grad():  # non-trivial norms and lambdas, so a swapped weight cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "lambda" in name or "logits" in name:
                p.copy_(0.5 + torch.rand_like(p))
    model.eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    with torch.no_grad():
        got = model(tokens, torch.arange(SEQ).expand(2, -1), mask)
        want = reference_logits(cfg, {k: v.detach() for k, v in model.state_dict().items()
                                      if isinstance(v, torch.Tensor)}, tokens)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
