"""Generation with the exported HF model (rf_megatron/hf/modeling_rfgpt.py), for every variant.

Needs only torch and transformers (no Megatron-Core), so CI also runs it against the oldest transformers we
claim. Models have random weights drawn so that their next-token distributions are far from uniform (a
sharpened output layer; learnable lambdas moved off 0.5), and every check compares per-step logits with a
full forward, which a broken cache cannot pass by luck (it is off by O(1)). They run in float64: in fp32 such
peaked logits (|logit| ~ 10) differ by up to 2e-5 from rounding alone; in float64 the bound is 1e-9 for
forward calls, and 1e-5 for generate()'s per-step logits (which transformers hands back in fp32).
"""
import importlib.util

import pytest
import torch

from conftest import REPO

VARIANTS = {
    "vanilla": dict(variant="vanilla"),
    "identity": dict(lambda_mode="identity"),
    "constant": dict(lambda_mode="constant", lambda_constant=0.7),
    "learnable": dict(lambda_mode="learnable"),
    "learnable_plus": dict(lambda_mode="learnable_plus"),
    "sparse": dict(lambda_mode="sparse", sparse_layers=[3, 4]),
    "svformer": dict(variant="svformer"),
    "svformer_gqa": dict(variant="svformer", num_key_value_heads=2),
}
VOCAB, PROMPT, NEW = 97, 9, 14
TOL = 1e-9
TOL_GENERATE = 1e-5  # generate() casts each step's logits to fp32


def build(variant: str, **extra):
    from rf_megatron.hf.configuration_rfgpt import RFGPTConfig
    from rf_megatron.hf.modeling_rfgpt import RFGPTForCausalLM

    config = RFGPTConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, initializer_range=0.12, pad_token_id=0, bos_token_id=None,
                         eos_token_id=None, **{**VARIANTS[variant], **extra})
    torch.manual_seed(0)
    model = RFGPTForCausalLM(config).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peaked next-token distributions
        for name, param in model.named_parameters():  # lambdas off their init: each layer mixes differently
            if "value_residual" in name:
                param.uniform_(0.2, 1.5)
    return model


def prompts(batch: int = 2, length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_informative(step_logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """The model is not degenerate: peaked distributions and varied tokens."""
    logp = step_logits.float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    assert entropy < 0.8 * torch.log(torch.tensor(float(VOCAB))).item(), entropy
    assert tokens.unique().numel() >= 5, tokens


def generated_logits(out) -> torch.Tensor:
    """[batch, new tokens, vocab] raw logits of each generation step."""
    return torch.stack(out.logits, dim=1)


def cache_of(out):
    from rf_megatron.hf.modeling_rfgpt import CACHE_ARG

    return getattr(out, CACHE_ARG)


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_logits_equal_a_full_forward(variant, sampling):
    model, ids = build(variant), prompts()
    torch.manual_seed(5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=sampling, top_k=None,
                             use_cache=True, output_logits=True, return_dict_in_generate=True)
        full = model(out.sequences).logits
    steps = generated_logits(out)
    assert out.sequences.shape[1] == PROMPT + NEW
    assert_informative(steps, out.sequences[:, PROMPT:])
    # step t predicts token PROMPT + t from the full forward's position PROMPT - 1 + t
    assert (steps - full[:, PROMPT - 1:-1]).abs().max().item() <= TOL_GENERATE
    cache = cache_of(out)
    assert cache.get_seq_length() == PROMPT + NEW - 1  # the last token is never fed back
    expected = "SharedValueCache" if variant.startswith("svformer") else "DynamicCache"
    assert type(cache).__name__ == expected


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
@pytest.mark.parametrize("variant", ["learnable_plus", "sparse", "svformer_gqa"])
def test_manual_decoding_with_a_cache_equals_a_full_forward(variant, argument):
    """Prefill, then one token at a time, under either name of the cache argument."""
    model, ids = build(variant), prompts(length=20)
    cache = model.model.new_cache()
    with torch.no_grad():
        full = model(ids).logits
        pieces = [model(ids[:, :8], use_cache=True, **{argument: cache}).logits]
        for t in range(8, 20):
            pieces.append(model(ids[:, t:t + 1], use_cache=True, **{argument: cache}).logits)
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= TOL
    assert cache.get_seq_length() == 20


@pytest.mark.parametrize("variant", ["identity", "learnable", "svformer", "svformer_gqa"])
def test_any_cache_class_works(variant):
    """A plain DynamicCache works for SVFormer too (it stores a copy of V_1 per layer: correct, no saving)."""
    from transformers import DynamicCache

    model, ids = build(variant), prompts(length=16)
    cache = DynamicCache()
    with torch.no_grad():
        full = model(ids).logits
        head = model(ids[:, :10], cache=cache, use_cache=True).logits
        tail = model(ids[:, 10:], cache=cache, use_cache=True).logits
    assert (torch.cat([head, tail], 1) - full).abs().max().item() <= TOL


@pytest.mark.parametrize("variant", ["vanilla", "learnable_plus", "constant", "svformer_gqa"])
def test_left_padded_batch_equals_each_prompt_alone(variant):
    model = build(variant)
    rows = [prompts(1, 5, seed=2)[0], prompts(1, 11, seed=3)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        batched = generated_logits(model.generate(ids, attention_mask=mask, **kwargs))
        for i, row in enumerate(rows):
            alone = model.generate(row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **kwargs)
            assert (batched[i] - generated_logits(alone)[0]).abs().max().item() <= TOL_GENERATE, i


@pytest.mark.parametrize("variant", ["learnable", "svformer", "svformer_gqa"])
def test_beam_search_with_cache_equals_without(variant):
    """Beam search reorders the cache every step (SVFormer: keys per layer, layer 1's values once)."""
    model, ids = build(variant), prompts()
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, num_beams=3, num_return_sequences=3, do_sample=False,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        plain = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, plain.sequences)
    assert (cached.sequences_scores - plain.sequences_scores).abs().max().item() <= TOL_GENERATE
    assert cached.sequences[:, PROMPT:].unique().numel() >= 5


def test_svformer_generate_cache_holds_values_once():
    """Through generate(): SVFormer's cache holds L layers of K and ONE of V, (L+1)/(2L) of vanilla's."""
    from rf_megatron.hf.modeling_rfgpt import cache_nbytes

    caches = {}
    for variant in ("vanilla", "svformer_gqa"):
        with torch.no_grad():
            out = build(variant, num_key_value_heads=2).generate(
                prompts(3), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        caches[variant] = cache_of(out)
    tokens = PROMPT + NEW - 1
    one_layer = 3 * 2 * tokens * 16 * 8  # batch x KV heads x tokens x head dim x float64 bytes
    L = 4
    assert caches["svformer_gqa"].get_seq_length() == tokens
    assert cache_nbytes(caches["vanilla"]) == 2 * L * one_layer
    assert cache_nbytes(caches["svformer_gqa"]) == (L + 1) * one_layer


def test_kv_cache_bench_prints_the_ratio(capsys):
    spec = importlib.util.spec_from_file_location("kv_cache_bench", REPO / "bench" / "kv_cache.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--layers", "8", "--hidden", "64", "--heads", "4", "--ffn", "96", "--vocab", "128",
                         "--prompt", "8", "--new", "4", "--rounds", "1"])
    assert result["ratio"] == 9 / 16 and result["cached_tokens"] == {"vanilla": 11, "svformer": 11}
    assert "svformer 0.563x" in capsys.readouterr().out
