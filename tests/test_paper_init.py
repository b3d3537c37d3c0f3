"""model.init=paper reproduces the paper's released code at step 0 (#30): its initial weights, loss and λ.

The released code (github.com/Zcchill/Value-Residual-Learning: src/train.py, src/modeling/modeling_llama_*.py,
scripts/run_llama_*_82M.sh; transformers 4.44.2) builds `LlamaForCausalLM(config)` from scratch after
`set_seed(seed)`, from `LlamaConfig()` with the script's overrides. Its weights are therefore Llama's
`_init_weights`: N(0, initializer_range) for every nn.Linear (no biases) and the nn.Embedding, with
initializer_range left at LlamaConfig's 0.02 and no depth scaling; RMSNorm weights 1; an untied lm_head
(`tie_word_embeddings=False`); no embedding row zeroed (no pad_token_id). Its ResFormer hard-codes
`0.5 * V_1 + 0.5 * V_n` in layers >= 2 (no λ parameters) and its SVFormer drops v_proj after layer 1.

The reference below is that model: transformers' own LlamaForCausalLM with the script's config (not our HF
export), under the same seed. Megatron draws its weights in another order (fused QKV, fc1 = [gate; up]), so its
weights are compared statistically, tensor by tensor; the DeepSpeed trainer's model is the very HF class, so it
must be the reference bit for bit. `init=megatron` (output projections scaled by 1/sqrt(2L)) must fail the same
checks, so they can fail.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config

pytestmark = pytest.mark.mcore_api  # every Megatron-Core version runs these (.ci/run)

L, HIDDEN, HEADS, FFN, VOCAB, SEQ, BATCH = 4, 128, 4, 352, 256, 64, 8
SEED = 42  # the released scripts' SEED
Z = 5.0  # every statistical tolerance below is Z standard errors (two-sided ~6e-7 under normality)
SEEDS = range(24)  # models per arm for the forward checks (initial loss, residual-stream scale)


def released_llama(seed: int, **overrides):
    """The released code's model: LlamaConfig() + the scripts' overrides (shrunk), built after seeding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=L,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, hidden_act="silu", rms_norm_eps=1e-5,
                         attention_dropout=0.0, tie_word_embeddings=False, max_position_embeddings=SEQ,
                         bos_token_id=0, eos_token_id=0, use_cache=False, **overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def ours_config(init: str, **changes) -> ModelConfig:
    return ModelConfig(num_layers=L, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                       vocab_size=VOCAB, seq_length=SEQ, init=init, **{"variant": "vanilla", **changes})


def megatron_model(init: str, seed: int, **changes):
    from rf_megatron.model import build_model_chunks

    cfg = ours_config(init, **changes)
    torch.manual_seed(seed)
    return build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), cpu=True))[0].eval()


def paired_tensors(megatron, hf):
    """(kind, Megatron tensor, the HF tensors it holds), covering every parameter of both models once."""
    ours = {k: v.detach().float() for k, v in megatron.named_parameters()}
    ref = {k: v.detach().float() for k, v in hf.named_parameters()}
    pairs = [("embedding", "embedding.word_embeddings.weight", ["model.embed_tokens.weight"]),
             ("output_layer", "output_layer.weight", ["lm_head.weight"]),
             ("norm", "decoder.final_layernorm.weight", ["model.norm.weight"])]
    for i in range(L):
        a, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        pairs += [("qkv", a + "self_attention.linear_qkv.weight", [h + f"self_attn.{p}_proj.weight" for p in "qkv"]),
                  ("attention_out", a + "self_attention.linear_proj.weight", [h + "self_attn.o_proj.weight"]),
                  ("fc1", a + "mlp.linear_fc1.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"]),
                  ("fc2", a + "mlp.linear_fc2.weight", [h + "mlp.down_proj.weight"]),
                  ("norm", a + "input_layernorm.weight", [h + "input_layernorm.weight"]),
                  ("norm", a + "pre_mlp_layernorm.weight", [h + "post_attention_layernorm.weight"])]
    assert sorted(o for _, o, _ in pairs) == sorted(ours), "a Megatron parameter is not paired"
    assert sorted(r for _, _, rs in pairs for r in rs) == sorted(ref), "an HF parameter is not paired"
    return [(kind, ours[o], torch.cat([ref[r].flatten() for r in rs]), o) for kind, o, rs in pairs]


# ------------------------------------------------------------------------------------------- weight statistics
@pytest.mark.parametrize("init", ["paper", "megatron"])
def test_every_tensor_has_the_released_llamas_statistics(init, megatron_single_rank):
    """Per tensor (each layer's q/k/v, o, gate/up, down; embedding; lm_head; norms), same seed: our std over the
    released model's is 1 within Z standard errors of a ratio of two sample stds of n iid normals,
    sqrt(1/(2 n_ours) + 1/(2 n_ref)) (3.9% for a 128x128 o_proj and the 256x128 embedding, 2.3% for a layer's
    q/k/v, 2.4% for a 128x352 down_proj); means 0 within Z std/sqrt(n); norms exactly 1. `megatron` must hold the
    same except linear_proj / linear_fc2 at 1/sqrt(2L) of the released std, which the `paper` bound rejects."""
    reference = released_llama(SEED)
    assert reference.config.initializer_range == ModelConfig().init_method_std == 0.02  # the released std
    assert reference.lm_head.weight.data_ptr() != reference.model.embed_tokens.weight.data_ptr()  # untied
    depth_scaled = ("attention_out", "fc2") if init == "megatron" else ()
    for kind, ours, ref, name in paired_tensors(megatron_model(init, SEED), reference):
        assert ours.numel() == ref.numel(), name
        if kind == "norm":
            assert torch.all(ours == 1) and torch.all(ref == 1), name
            continue
        n_ours, n_ref = ours.numel(), ref.numel()
        tolerance = Z * math.sqrt(1 / (2 * n_ours) + 1 / (2 * n_ref))
        ratio = float(ours.std() / ref.std())
        expected = 1 / math.sqrt(2 * L) if kind in depth_scaled else 1.0
        assert abs(ratio / expected - 1) < tolerance, f"{init} {name}: std ratio {ratio:.4f}, not {expected:.4f}"
        if kind in depth_scaled:  # what the `paper` check above would have said about this init
            assert abs(ratio - 1) > tolerance, name
        for values in (ours, ref):
            assert abs(float(values.mean())) < Z * float(values.std()) / math.sqrt(values.numel()), name


# --------------------------------------------------------------------------------------- forward at step 0
def real_tokens() -> torch.Tensor:
    """BATCH x (SEQ + 1) byte tokens of real English text (this repository's README; VOCAB = 256 bytes), so the
    test needs no data/ folder (a fresh clone has none)."""
    from pathlib import Path

    raw = (Path(__file__).resolve().parents[1] / "README.md").read_bytes()[: BATCH * (SEQ + 1)]
    assert len(raw) == BATCH * (SEQ + 1)
    return torch.tensor(list(raw), dtype=torch.long).view(BATCH, SEQ + 1)


def step0_figures(model, tokens, megatron: bool):
    """(next-token loss over the batch, its log-partition part mean(logsumexp logits), RMS of the residual stream
    entering the final norm)."""
    final_norm = model.decoder.final_layernorm if megatron else model.model.norm
    seen = []
    hook = final_norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    inputs = tokens[:, :-1]
    with torch.no_grad():
        if megatron:
            mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
            logits = model(inputs, torch.arange(SEQ).expand(BATCH, -1), mask)
        else:
            logits = model(inputs).logits
    hook.remove()
    logits = logits.float().reshape(-1, VOCAB)
    loss = F.cross_entropy(logits, tokens[:, 1:].reshape(-1))
    return float(loss), float(logits.logsumexp(-1).mean()), float(seen[0].float().pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def step0(megatron_single_rank):
    """Per arm, a [len(SEEDS), 3] tensor of step0_figures: the released Llama and Megatron under each init, one
    model per seed, all on the same token batch."""
    tokens = real_tokens()
    arms = {"released": lambda s: step0_figures(released_llama(s), tokens, megatron=False)}
    for init in ("paper", "megatron"):
        arms[init] = lambda s, init=init: step0_figures(megatron_model(init, s), tokens, megatron=True)
    return {arm: torch.tensor([run(s) for s in SEEDS], dtype=torch.float64) for arm, run in arms.items()}


def within(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(|mean a - mean b|, Z standard errors of that difference): independent seeds in each arm."""
    return abs(float(a.mean() - b.mean())), Z * math.sqrt(float(a.var() / len(a) + b.var() / len(b)))


def test_initial_loss_is_the_released_llamas(step0):
    """At init the logits are z = W_out h, h the final RMSNorm's output (||h||^2 = HIDDEN), W_out N(0, 0.02^2):
    given h, z_v ~ N(0, s^2) with s^2 = 0.02^2 HIDDEN, so loss = logsumexp z - z_y has E = ln V + s^2 / 2 =
    ln 256 + 0.026 = 5.571 (E[e^z] = e^(s^2/2); E[z_y] = 0). One seed's loss scatters by ~0.03 nats (which rows of
    W_out the frequent bytes hit), so the loss is compared as a mean over len(SEEDS) seeds per arm, within Z
    standard errors of the difference of the means (~0.04 nats). That is coarse next to the 0.026 excess, so its
    less noisy part is checked too: the log-partition mean(logsumexp z) (the loss plus the target logit, which is
    what scatters most) sits at ln V + s^2 / 2 with a seed-to-seed sd of ~0.007, held to Z standard errors of the
    difference (~0.01 nats; a std of 0.03 instead of 0.02 would add 0.032). The released model meets the
    expectation itself (its mean within Z standard errors), so the reference is the model the analysis describes."""
    expected = math.log(VOCAB) + 0.02 ** 2 * HIDDEN / 2
    released, paper = step0["released"], step0["paper"]
    for column, what in ((0, "loss"), (1, "log-partition")):
        assert abs(float(released[:, column].mean()) - expected) < (
            Z * float(released[:, column].std()) / math.sqrt(len(released))), what
        gap, tolerance = within(paper[:, column], released[:, column])
        assert gap < tolerance, (what, float(paper[:, column].mean()), float(released[:, column].mean()), tolerance)


def test_residual_stream_has_the_released_llamas_scale(step0):
    """The loss hardly sees the trunk (the final norm rescales it); the residual stream entering that norm does:
    embedding (std 0.02) plus each layer's attention and MLP outputs, whose scale the output projections set. Mean
    RMS over the seeds: `paper` equals the released model's within Z standard errors (~0.004, about 5% of it);
    `megatron`'s 1/sqrt(2L) output projections give about a third of it, far outside."""
    released, paper, megatron = (step0[arm][:, 2] for arm in ("released", "paper", "megatron"))
    gap, tolerance = within(paper, released)
    assert gap < tolerance, (float(paper.mean()), float(released.mean()), tolerance)
    gap, tolerance = within(megatron, released)
    assert gap > tolerance and float(megatron.mean()) < 0.6 * float(released.mean()), float(megatron.mean())


# ------------------------------------------------------------------------------------------------- the λ
LAMBDA_CONSTANT = 1.7
# (λ1, λ2) at step 0 per 1-based mixing layer. identity: the released code's hard-coded 0.5 V_1 + 0.5 V_n in every
# layer >= 2 (sparse: the same on the last half); the other modes are not in the released code, so their inits are
# the ones value_residual_spec.py documents (learnable 0.5 / 0.5; learnable_plus s * softmax(z) with s = the
# number of mixing layers and z = 0, so λ1 = 1, and λ2 = 0.5)
LAMBDAS = {
    "identity": {n: (0.5, 0.5) for n in range(2, L + 1)},
    "sparse": {n: (0.5, 0.5) for n in range(L // 2 + 1, L + 1)},
    "constant": {n: (LAMBDA_CONSTANT, 1.0) for n in range(2, L + 1)},
    "learnable": {n: (0.5, 0.5) for n in range(2, L + 1)},
    "learnable_plus": {n: (1.0, 0.5) for n in range(2, L + 1)},
}


@pytest.mark.parametrize("mode", list(LAMBDAS))
@pytest.mark.parametrize("init", ["paper", "megatron"])
def test_lambdas_start_where_the_paper_starts_them(mode, init, megatron_single_rank):
    """Both trainers, either init (model.init touches weights only). identity, like the released ResFormer, has no
    parameter of its own: the same parameters as vanilla."""
    from rf_megatron.hf.weights import lambda_table
    from rf_megatron.engines.deepspeed_model import build_fresh

    cfg = ours_config(init, variant="resformer", lambda_mode=mode, lambda_constant=LAMBDA_CONSTANT)
    megatron = megatron_model(init, SEED, variant="resformer", lambda_mode=mode, lambda_constant=LAMBDA_CONSTANT)
    got = {n + 1: tuple(float(x) for x in layer.self_attention.value_lambdas())
           for n, layer in enumerate(megatron.decoder.layers) if layer.self_attention.value_lambdas is not None}
    hf = {k: v.detach() for k, v in build_fresh(cfg, seed=SEED).state_dict().items()}
    for engine, table in (("megatron", got), ("deepspeed", lambda_table(hf, cfg))):
        assert table.keys() == LAMBDAS[mode].keys(), (engine, table)
        assert all(pair == pytest.approx(LAMBDAS[mode][n], abs=1e-6) for n, pair in table.items()), (engine, table)
    if mode in ("identity", "sparse", "constant"):
        vanilla = megatron_model(init, SEED)
        assert [n for n, _ in megatron.named_parameters()] == [n for n, _ in vanilla.named_parameters()]


# ------------------------------------------------------------------------------------ the DeepSpeed trainer
@pytest.mark.parametrize("variant,mode", [("vanilla", "identity"), ("resformer", "identity"),
                                          ("resformer", "learnable_plus")])
def test_the_deepspeed_model_is_the_released_init_bit_for_bit(variant, mode):
    """Same seed, same transformers: every weight the released model has is equal (the λ come on top, constants
    drawing no random numbers); its ResFormer has the vanilla Llama's parameters, drawn in the same order."""
    from rf_megatron.engines.deepspeed_model import build_fresh

    reference = released_llama(SEED).state_dict()
    ours = build_fresh(ours_config("paper", variant=variant, lambda_mode=mode), seed=SEED).state_dict()
    assert set(reference) <= set(ours) and all("value_residual" in k for k in set(ours) - set(reference))
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
