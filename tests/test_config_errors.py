"""Configs that cannot work fail up front with one line naming the option (no process groups)."""
import pytest

from rf_megatron.config import ConfigError, ModelConfig, ParallelConfig, build_transformer_config, replace



pytestmark = pytest.mark.mcore_api  # every Megatron-Core version runs these (.ci/run)

def error_of(model=None, parallel=None, world_size=None):
    parallel = parallel or ParallelConfig()
    with pytest.raises(ConfigError) as info:
        parallel.validate(world_size)
        (model or ModelConfig()).validate(parallel)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_tp_must_divide_kv_groups_for_value_residual():
    msg = error_of(ModelConfig(num_attention_heads=4, num_query_groups=1), ParallelConfig(tensor_parallel=2))
    assert "tensor_parallel=2" in msg and "num_query_groups=1" in msg


def test_vanilla_gqa_with_fewer_kv_heads_than_tp_is_allowed():
    ModelConfig(variant="vanilla", num_query_groups=1).validate(ParallelConfig(tensor_parallel=2))


def test_unknown_variant_and_lambda_mode():
    assert "variant='resformr'" in error_of(ModelConfig(variant="resformr"))
    assert "lambda_mode='dense'" in error_of(ModelConfig(lambda_mode="dense"))


def test_svformer_takes_no_lambda_mode():
    assert "lambda_mode='learnable'" in error_of(ModelConfig(variant="svformer", lambda_mode="learnable"))


def test_sparse_layers_must_exist_and_skip_layer_one():
    assert "sparse_layers=[1, 3]" in error_of(ModelConfig(lambda_mode="sparse", sparse_layers=[1, 3]))
    assert "sparse_layers=[9]" in error_of(ModelConfig(lambda_mode="sparse", sparse_layers=[9]))
    assert "sparse_layers=[]" in error_of(ModelConfig(lambda_mode="sparse", sparse_layers=[]))


@pytest.mark.parametrize("choice", [dict(variant="resformr"), dict(lambda_mode="dense"),
                                    dict(variant="svformer", lambda_mode="learnable"), dict(num_layers=1),
                                    dict(lambda_mode="sparse", sparse_layers=[]),
                                    dict(lambda_mode="sparse", sparse_layers=[1, 3])])
def test_the_run_config_and_the_hf_config_refuse_a_value_residual_choice_with_the_same_line(choice):
    """One set of rules (value_residual_spec.config_problem): a choice the trainer refuses cannot be written
    into an RFGPT config.json either."""
    pytest.importorskip("transformers")
    from rf_megatron.hf.configuration_rfgpt import RFGPTConfig

    choice = {"num_layers": 4, **choice}
    with pytest.raises(ValueError) as info:
        RFGPTConfig(**{{"num_layers": "num_hidden_layers"}.get(k, k): v for k, v in choice.items()})
    model = ModelConfig(**choice)
    assert error_of(model) == str(info.value)


def test_the_old_residual_layers_key_still_works_with_a_one_line_note(capsys):
    from rf_megatron.run_config import load_run_config

    cfg = load_run_config("tiny_cpu", ["model.lambda_mode=sparse", "model.residual_layers=[3]"])
    assert cfg.model.sparse_layers == [3]
    assert capsys.readouterr().err == "note: model.residual_layers is deprecated, use model.sparse_layers (same meaning)\n"
    with pytest.raises(ConfigError, match="model.residual_layers and model.sparse_layers are both set"):
        load_run_config("tiny_cpu", ["model.residual_layers=[3]", "model.sparse_layers=[3]"])


def test_layers_must_split_over_pipeline_stages():
    msg = error_of(ModelConfig(num_layers=6), ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2))
    assert "num_layers=6" in msg


def test_sequence_parallel_needs_tensor_parallel():
    assert "sequence_parallel" in error_of(parallel=ParallelConfig(sequence_parallel=True))


def test_context_parallel_is_refused_for_value_residual():
    assert "context_parallel" in error_of(parallel=ParallelConfig(context_parallel=2))


def test_learnable_plus_refuses_overlapped_grad_reduce_across_stages():
    msg = error_of(ModelConfig(lambda_mode="learnable_plus"),
                   ParallelConfig(pipeline_parallel=2, overlap_grad_reduce=True))
    assert "overlap_grad_reduce" in msg


def test_fp8_needs_transformer_engine():
    assert "fp8" in error_of(parallel=ParallelConfig(fp8="hybrid"))


def test_compiled_layers_need_the_local_spec():
    assert error_of(parallel=ParallelConfig(compile_layers=True, transformer_impl="transformer_engine")) == \
        "compile_layers needs transformer_impl=local (Transformer Engine's modules are not compiled here)"


def test_compiled_layers_refuse_selective_recompute():
    msg = error_of(parallel=ParallelConfig(compile_layers=True, recompute_granularity="selective"))
    assert msg.startswith("compile_layers with recompute_granularity=selective") and "use full recompute" in msg


def test_te_attention_backend_needs_the_transformer_engine_spec():
    assert error_of(ModelConfig(attention_backend="te")) == \
        "attention_backend=te needs parallel.transformer_impl=transformer_engine"


def test_unknown_attention_backend_names_the_choices():
    assert error_of(ModelConfig(attention_backend="flash")) == \
        "attention_backend='flash': choose one of auto, sdpa, unfused, te"


def test_world_size_must_fit_the_layout():
    assert "world size 6" in error_of(parallel=ParallelConfig(tensor_parallel=4), world_size=6)


def test_value_residual_needs_two_layers():
    assert "num_layers >= 2" in error_of(ModelConfig(num_layers=1))


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match="hiden_size"):
        replace(ModelConfig(), hiden_size=3)


def test_build_transformer_config_validates_before_megatron():
    with pytest.raises(ConfigError, match="tensor_parallel=3"):
        build_transformer_config(ModelConfig(), ParallelConfig(tensor_parallel=3))


def test_split_qkv_path_is_required(megatron_single_rank):
    from rf_megatron.model import build_model_chunks

    cfg = ModelConfig(variant="svformer", num_layers=2, vocab_size=256)
    model = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), cpu=True))[0]
    attention = model.decoder.layers[1].self_attention
    with pytest.raises(ValueError, match="apply_rope_fusion"):
        attention.get_query_key_value_tensors(None, split_qkv=False)


def test_an_evaluation_that_would_move_checkpoints_is_refused():
    from rf_megatron.run_config import load_run_config

    cfg = load_run_config("tiny_cpu", ["train.eval_only=true", "checkpoint.start_over=true"])
    with pytest.raises(ConfigError, match="an evaluation never moves checkpoints"):
        cfg.validate()


@pytest.mark.parametrize("paths", [["0.5", "a", "0.5"], ["0.5", "a", "b", "c"], ["a", "0.5"], ["-1", "a", "2", "b"]])
def test_a_blend_that_does_not_alternate_weight_and_prefix_is_one_line(paths):
    from rf_megatron.data import blend_prefixes

    with pytest.raises(ConfigError, match="data paths") as info:
        blend_prefixes(paths)
    assert "\n" not in str(info.value)


def test_a_blend_and_plain_prefixes_still_parse():
    from rf_megatron.data import blend_prefixes

    assert blend_prefixes(["0.3", "a", "0.7", "b"]) == ["a", "b"] and blend_prefixes(["a", "b"]) == ["a", "b"]


def test_independent_problems_of_a_config_are_reported_together_in_one_line():
    from rf_megatron.run_config import load_run_config

    cfg = load_run_config("tiny_cpu", ["data.tokenizer_model=missing.model", "model.num_attention_heads=3",
                                       "optim.lr=-1", "train.eval_steps=0", "data.paths=[x]"])
    with pytest.raises(ConfigError) as err:
        cfg.validate(2)
    assert str(err.value) == (
        "4 problems in the config: data.tokenizer_model: tokenizer model missing.model: no such file "
        "(model.vocab_size=null takes its vocabulary); hidden_size=128 is not divisible by num_attention_heads=3; "
        "optim.lr=-1.0 must be a finite number >= 0; train.eval_steps=0 must be positive")


def test_every_unknown_option_and_wrong_type_is_named_at_once():
    from rf_megatron.run_config import load_run_config

    with pytest.raises(ConfigError) as err:
        load_run_config("tiny_cpu", ["train.train_stepz=3", "model.hidden_size=big", "optim.lr=[1]"])
    assert str(err.value) == ("3 problems in the config: model.hidden_size='big': expected int; optim.lr=[1]: "
                              "expected float; unknown option train.train_stepz (did you mean train.train_steps?)")


def test_a_datasets_bin_or_idx_file_names_its_prefix():
    """Shells complete file names: `data.paths=[data/x_text_document.bin]` used to reach Megatron unchanged (a
    traceback from its dataset builder on every rank)."""
    from rf_megatron.run_config import load_run_config

    cfg = load_run_config("tiny_cpu", ["data.paths=[0.3, d/a.bin, 0.7, d/b.idx]", "data.valid_paths=[v.bin]",
                                       "data.test_paths=[t]"])
    assert (cfg.data.paths, cfg.data.valid_paths, cfg.data.test_paths) == (["0.3", "d/a", "0.7", "d/b"], ["v"], ["t"])


def test_a_single_value_for_a_list_option_shows_the_list_to_write():
    from rf_megatron.run_config import load_run_config

    with pytest.raises(ConfigError) as err:
        load_run_config("tiny_cpu", ["data.paths=data/x"])
    assert str(err.value) == "data.paths='data/x': expected a list, e.g. data.paths=[data/x]"
