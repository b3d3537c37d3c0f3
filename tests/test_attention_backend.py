"""`model.attention_backend`: SDPA core attention (rf_megatron/sdpa_attention.py) computes what Megatron's
unfused `DotProductAttention` computes, for every variant, GQA, recompute and under TP / SP / PP. The same
TP2 x PP2 launch checks torch's fused AdamW (optim.fused, rf_megatron/step_kernels.py) against the default
foreach one, and compiled layers (parallel.compile_layers) against eager ones (the fused cross-entropy:
tests/test_step_kernels.py).

Same weights in both models, fp32, logits and gradients within 1e-5. (The option's config errors:
tests/test_config_errors.py; bench/throughput.py times the two: tests/test_throughput_bench.py.)
"""
import pytest
import torch

from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config

pytestmark = pytest.mark.mcore_api  # every Megatron-Core version runs these (.ci/run)

SEQ, VOCAB = 16, 128
CASES = {
    "vanilla": dict(variant="vanilla"),
    "identity": dict(variant="resformer", lambda_mode="identity"),
    "learnable": dict(variant="resformer", lambda_mode="learnable"),
    "learnable_plus": dict(variant="resformer", lambda_mode="learnable_plus"),
    "sparse": dict(variant="resformer", lambda_mode="sparse", sparse_layers=[3]),
    "svformer": dict(variant="svformer"),
    "vanilla_gqa": dict(variant="vanilla", num_query_groups=2),
    "identity_gqa": dict(variant="resformer", lambda_mode="identity", num_query_groups=2),
    "svformer_gqa": dict(variant="svformer", num_query_groups=2),
}


def logits_and_grads(case, backend, parallel=None, attention_dropout=0.0, seed=0, before=None):
    """One training-mode forward + backward of a 3-layer model built with `backend`; the weights are drawn from
    `seed` (non-trivial norms and lambdas, so a swapped weight cannot hide; init std 0.1, so attention is far
    from uniform and a wrong scale or mask shows). `before([model])` runs before the forward."""
    from megatron.core import tensor_parallel

    from rf_megatron.model import build_model_chunks

    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=VOCAB,
                      seq_length=SEQ, init_method_std=0.1, attention_backend=backend, **CASES[case])
    config = build_transformer_config(cfg, parallel or ParallelConfig(), cpu=True)
    config.attention_dropout = attention_dropout
    torch.manual_seed(seed)
    model = build_model_chunks(cfg, config)[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "lambda" in name or "logits" in name:
                p.copy_(0.5 + torch.rand_like(p))
    if before is not None:
        before([model])
    model.train()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    torch.manual_seed(2)  # the same dropout draws in every run
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    logits = model(tokens, torch.arange(SEQ).expand(2, -1), mask)
    logits.float().square().mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def max_differences(a, b):
    """(max |logits difference|, max |gradient difference| over all parameters)."""
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert set(grads_a) == set(grads_b)
    return (logits_a - logits_b).abs().max().item(), max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_matches_unfused_logits_and_grads(case, megatron_single_rank):
    logits_err, grad_err = max_differences(logits_and_grads(case, "sdpa"), logits_and_grads(case, "unfused"))
    assert logits_err <= 1e-5 and grad_err <= 1e-5, (logits_err, grad_err)


def test_auto_backend_is_sdpa_on_the_local_spec(megatron_single_rank):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from rf_megatron.model import build_model_chunks
    from rf_megatron.sdpa_attention import SDPADotProductAttention

    kinds = {}
    for backend in ("auto", "unfused"):
        cfg = ModelConfig(num_layers=2, attention_backend=backend)
        model = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), cpu=True))[0]
        kinds[backend] = {type(layer.self_attention.core_attention) for layer in model.decoder.layers}
    assert kinds == {"auto": {SDPADotProductAttention}, "unfused": {DotProductAttention}}


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_sdpa_under_recompute_matches_unfused_without(granularity, megatron_single_rank):
    plain = logits_and_grads("identity", "unfused")
    recomputed = logits_and_grads("identity", "sdpa", ParallelConfig(recompute_granularity=granularity))
    logits_err, grad_err = max_differences(recomputed, plain)
    assert logits_err <= 1e-5 and grad_err <= 1e-5, (logits_err, grad_err)


def test_sdpa_dropout_is_replayed_by_selective_recompute(megatron_single_rank):
    """Recompute draws the same dropout mask again: gradients equal those of a run that kept the activations."""
    kept = logits_and_grads("identity", "sdpa", attention_dropout=0.2)
    recomputed = logits_and_grads("identity", "sdpa", ParallelConfig(recompute_granularity="selective"),
                                  attention_dropout=0.2)
    no_dropout = logits_and_grads("identity", "sdpa")
    assert max_differences(kept, no_dropout)[0] > 1e-3  # dropout is on in training
    logits_err, grad_err = max_differences(recomputed, kept)
    assert logits_err <= 1e-6 and grad_err <= 1e-6, (logits_err, grad_err)


# one launch, 4 processes: TP2 x PP2 with sequence parallel, each variant with both backends, and two variants with
# the fused AdamW, and one with compiled layers (rf_megatron/layer_compile.py: V_1 across stages, TP and SP
# collectives inside the compiled graphs; every variant compiled on one rank: tests/test_layer_compile.py)
DIST_VARIANTS = ["vanilla", "learnable_plus", "svformer_gqa"]
STEP_OPTIONS = {"fused_adam": ["learnable_plus", "svformer_gqa"], "compile_layers": ["learnable_plus"]}


@pytest.fixture(scope="module")
def tp2_pp2_sp_both_backends(tmp_path_factory):
    from test_layout_equivalence import launch

    names = [f"{v}@{b}" for v in DIST_VARIANTS for b in ("unfused", "sdpa")]
    names += [f"{v}@sdpa+{option}" for option, variants in STEP_OPTIONS.items() for v in variants]
    return launch(4, ["--tp", 2, "--pp", 2, "--sp", "--steps", 2, "--variants", ",".join(names)],
                  tmp_path_factory.mktemp("attention_backend"))


@pytest.mark.parametrize("variant", DIST_VARIANTS)
def test_sdpa_matches_unfused_under_tp2_pp2_sp(variant, tp2_pp2_sp_both_backends):
    sdpa, unfused = tp2_pp2_sp_both_backends[f"{variant}@sdpa"], tp2_pp2_sp_both_backends[f"{variant}@unfused"]
    assert torch.allclose(torch.tensor(sdpa["losses"]), torch.tensor(unfused["losses"]), rtol=0, atol=1e-5)
    assert set(sdpa["grads"]) == set(unfused["grads"]) and sdpa["grads"]
    grad_err = max((sdpa["grads"][n] - g).abs().max().item() for n, g in unfused["grads"].items())
    assert grad_err <= 1e-5, grad_err


# after two lr=1e-2 Adam steps: Adam divides by sqrt(v), so where gradients differ by rounding (compiled layers)
# near-zero ones move a weight by up to a few % of a step (tests/test_layout_equivalence.py's bound)
PARAMS_TOLERANCE = {"fused_adam": 1e-5, "compile_layers": 1e-3}


@pytest.mark.parametrize("option,variant", [(o, v) for o, vs in STEP_OPTIONS.items() for v in vs])
def test_step_option_matches_the_default_under_tp2_pp2_sp(option, variant, tp2_pp2_sp_both_backends):
    """Two steps with the option on: the same losses and first-step gradients as without it to fp32 rounding (the
    fused and compiled kernels sum in another order), and the weights after the second update."""
    plain, fused = tp2_pp2_sp_both_backends[f"{variant}@sdpa"], tp2_pp2_sp_both_backends[f"{variant}@sdpa+{option}"]
    assert torch.allclose(torch.tensor(fused["losses"]), torch.tensor(plain["losses"]), rtol=0, atol=1e-5)
    for what, tolerance in (("grads", 1e-5), ("params", PARAMS_TOLERANCE[option])):
        assert set(fused[what]) == set(plain[what]) and plain[what]
        err = max((fused[what][n] - p).abs().max().item() for n, p in plain[what].items())
        assert err <= tolerance, (what, err)
