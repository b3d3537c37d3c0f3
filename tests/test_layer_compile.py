"""`parallel.compile_layers`: every transformer layer under torch.compile (rf_megatron/layer_compile.py) computes
what the eager layer computes, in one graph for all the layers after the first, with no graph break.

Same weights, fp32, logits and gradients within 1e-5 (tests/test_attention_backend.py's 3-layer model). Under
TP2 x PP2 with sequence parallel: tests/test_attention_backend.py's launch; a failing compiler through the trainer:
tests/test_pretrain_errors.py.
"""
import pytest
import torch

from rf_megatron.config import ParallelConfig
from test_attention_backend import logits_and_grads, max_differences

# layers 2 and 3 of a value-residual model trace one graph, layer 1 (which publishes V_1) another; sparse's layer 2
# is plain attention: a third
GRAPHS = {"vanilla": 1, "learnable_plus": 2, "sparse": 3, "svformer_gqa": 2}


def compiled_counts(run):
    """(run's result, dynamo's graph count, graph breaks) from a fresh compiler state."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    result = run()
    return result, counters["stats"]["unique_graphs"], dict(counters["graph_break"])


def compiled(case, parallel=None):
    from rf_megatron import layer_compile

    return logits_and_grads(case, "sdpa", parallel, before=layer_compile.compile_layers)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.mcore_api) if c == "learnable_plus" else c
                                  for c in GRAPHS])
def test_compiled_layers_match_eager_in_one_graph_after_the_first(case, megatron_single_rank):
    got, graphs, breaks = compiled_counts(lambda: compiled(case))
    logits_err, grad_err = max_differences(got, logits_and_grads(case, "sdpa"))
    assert logits_err <= 1e-5 and grad_err <= 1e-5, (logits_err, grad_err)
    assert not breaks and graphs == GRAPHS[case], (graphs, breaks)


def test_compiled_layers_under_full_recompute_match_eager_without(megatron_single_rank):
    """The checkpointed chunk calls the compiled layers twice (no grad, then grad): one graph per layer kind each."""
    got, graphs, breaks = compiled_counts(
        lambda: compiled("identity", ParallelConfig(recompute_granularity="full", compile_layers=True)))
    logits_err, grad_err = max_differences(got, logits_and_grads("identity", "sdpa"))
    assert logits_err <= 1e-5 and grad_err <= 1e-5, (logits_err, grad_err)
    assert not breaks and graphs == 4, (graphs, breaks)


def test_build_model_compiles_every_layer_in_place_when_asked(megatron_single_rank):
    """The same parameter names and checkpoint keys either way: a run may turn the option on or off on resume."""
    from rf_megatron.build import build_model
    from rf_megatron.config import ModelConfig
    from rf_megatron.model import unwrap

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=128,
                      seq_length=16, variant="resformer", lambda_mode="learnable_plus")
    keys = {}
    for on in (False, True):
        chunks, _ = build_model(cfg, ParallelConfig(compile_layers=on))
        model = unwrap(chunks[0])
        assert [layer._compiled_call_impl is not None for layer in model.decoder.layers] == [on] * 2
        keys[on] = (set(model.state_dict()), set(model.sharded_state_dict()))
    assert keys[True] == keys[False]


def train_then_evaluate(compile_layers: bool):
    """Two optimizer steps and one evaluation through Megatron's schedule and optimizer, as the trainer runs them
    (rf_megatron/engines/megatron.py): (train losses, eval loss)."""
    from rf_megatron.build import build_model, build_optimizer
    from rf_megatron.config import ModelConfig, OptimConfig
    from rf_megatron.data import causal_mask
    from rf_megatron.engines.megatron import _global_loss, run_global_batch

    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=128,
                      seq_length=16, variant="resformer", lambda_mode="learnable")
    torch.manual_seed(0)
    model, _ = build_model(cfg, ParallelConfig(compile_layers=compile_layers))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, lr_warmup_steps=0), ParallelConfig())
    g = torch.Generator().manual_seed(1)

    def batch():
        t = torch.randint(0, 128, (2, 17), generator=g)
        return [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(2, 16), attention_mask=causal_mask(16),
                     position_ids=torch.arange(16).expand(2, -1))] * 2

    def run(microbatches, forward_only=False):
        return _global_loss(run_global_batch(model, microbatches, 16, forward_only))

    losses = []
    for _ in range(2):
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        losses.append(run(batch()))
        optimizer.step()
    model[0].eval()
    with torch.no_grad():
        evaluated = run(batch(), forward_only=True)
    model[0].train()
    return losses, evaluated


def test_training_steps_and_evaluation_match_eager(megatron_single_rank):
    """Through the trainer's schedule, optimizer and evaluation mode (its own graphs: layer 1 and the rest, each in
    training and in evaluation): the same losses."""
    eager_losses, eager_eval = train_then_evaluate(False)
    (losses, evaluated), graphs, breaks = compiled_counts(lambda: train_then_evaluate(True))
    assert not breaks and graphs == 4, (graphs, breaks)
    assert torch.allclose(torch.tensor(losses + [evaluated]), torch.tensor(eager_losses + [eager_eval]),
                          rtol=0, atol=1e-5), (losses, evaluated, eager_losses, eager_eval)
