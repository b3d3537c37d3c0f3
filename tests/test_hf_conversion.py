"""Megatron checkpoint <-> Hugging Face conversion (rf_megatron/hf, tools/convert_*).

One torchrun launch trains every variant 2 steps with the real Trainer in TP2 x PP2 (4 processes);
each checkpoint is exported in this process and the HF model's logits are compared with the
Megatron model's (TP1 x PP1, loaded in this process from the same checkpoint). Then: HF ->
checkpoint -> HF round trips (incl. virtual PP), the trainer resuming from a converted checkpoint,
generate() with and without cache, sdpa vs eager, gradient checkpointing, SVFormer's cache bytes,
the tokenizer, and the converters' one-line errors.
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, build_tiny_corpus, torchrun

pytest.importorskip("transformers", minversion="5.0")
pytest.importorskip("safetensors")
pytest.importorskip("google.protobuf")  # the SentencePiece model proto (tokenizer conversion)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAIN = REPO / "pretrain" / "pretrain_resformer.py"
VARIANTS = {
    "vanilla": {"model.variant": "vanilla"},
    "identity": {"model.lambda_mode": "identity"},
    "constant": {"model.lambda_mode": "constant", "model.lambda_constant": 1.7},
    "learnable": {"model.lambda_mode": "learnable"},
    "learnable_plus": {"model.lambda_mode": "learnable_plus"},
    "sparse": {"model.lambda_mode": "sparse", "model.sparse_layers": "[3]"},
    "svformer_gqa": {"model.variant": "svformer", "model.num_query_groups": 2},
    "identity_bf16": {"model.lambda_mode": "identity", "parallel.params_dtype": "bf16"},
}
LAYERS, VOCAB = 4, 512


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name, *args):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc


def shared_overrides(data):
    return {
        "data.paths": f"[{data / 'corpus'}]", "data.tokenizer_model": data / "tok.model",
        "data.cache_dir": data / "cache", "data.split": "90,10,0",
        "model.num_layers": LAYERS, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.ffn_hidden_size": 128, "model.vocab_size": VOCAB, "model.seq_length": 64,
        "train.train_steps": 2, "train.global_batch_size": 8, "train.micro_batch_size": 2,
        "train.log_interval": 1, "train.eval_interval": 0, "train.eval_steps": 1, "train.lambda_log_interval": 0,
        "optim.lr_warmup_steps": 1, "optim.lr": 0.003, "logging.wandb_project": "null",
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The shared tiny corpus, tokenizer and indexed dataset."""
    return build_tiny_corpus(tmp_path_factory.mktemp("hfdata"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """variant -> checkpoint root, each trained 2 steps by the Trainer in TP2 x PP2."""
    out = tmp_path_factory.mktemp("trained")
    layout = {"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2}
    args = [f"{k}={v}" for k, v in {**shared_overrides(data), **layout}.items()]
    torchrun(REPO / "tests" / "dist" / "hf_train_variants.py", 4, out, json.dumps(VARIANTS), *args, timeout=900)
    return {name: out / name / "ckpt" for name in VARIANTS}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def exported(trained, tokens, megatron_single_rank, tmp_path_factory):
    """variant -> (HF folder, Megatron logits on `tokens`), exported in this process."""
    from rf_megatron.hf import export as ex

    out, result = tmp_path_factory.mktemp("hf"), {}
    for name, root in trained.items():
        it = ex.resolve_checkpoint(root)
        cfg = ex.read_run_config(it)
        with ex.megatron_single_process():
            logits = ex.megatron_logits(ex.load_megatron_model(it, cfg), tokens)
        folder = ex.export(root, out / name, verify=False, max_shard_size="100KB" if name == "learnable" else "5GB",
                           log=lambda *_: None)
        result[name] = (folder, logits)
    return result


def load_hf(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    remote = (folder / "modeling_rfgpt.py").exists()
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote, dtype=torch.float32,
                                                **kwargs).eval()


# --------------------------------------------------------------------------------------------------
# Megatron -> HF
# --------------------------------------------------------------------------------------------------
@pytest.mark.mcore_api
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_logits_match_megatron(variant, exported, tokens):
    folder, want = exported[variant]
    model = load_hf(folder)
    with torch.no_grad():
        got = model(tokens).logits
    assert got.shape == want.shape == (2, 24, VOCAB)
    assert (got - want).abs().max().item() <= 1e-4
    if variant == "vanilla":
        assert type(model).__name__ == "LlamaForCausalLM" and not list(folder.glob("*.py"))
    else:
        assert type(model).__name__ == "RFGPTForCausalLM"


@pytest.mark.mcore_api
def test_single_process_load_fills_every_parameter(trained, megatron_single_rank):
    """{"model0": TP1PP1 sharded_state_dict} of a TP2 x PP2 checkpoint loads every tensor."""
    from rf_megatron.config import ParallelConfig, build_transformer_config
    from rf_megatron.hf import export as ex
    from rf_megatron.model import build_model_chunks

    it = ex.resolve_checkpoint(trained["learnable_plus"])
    cfg = ex.read_run_config(it)
    with ex.megatron_single_process():
        torch.manual_seed(99)
        fresh = build_model_chunks(cfg.model, build_transformer_config(cfg.model, ParallelConfig(), cpu=True))[0]
        loaded = ex.load_megatron_model(it, cfg)
    before = dict(fresh.named_parameters())
    for name, param in loaded.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} was not loaded"
    lam2 = loaded.decoder.layers[2].self_attention.value_lambdas.value_residual_lambda2
    assert abs(float(lam2) - 0.5) > 0.05  # the perturbed value, not the init


def test_a_new_lambda_mode_is_one_entry_in_the_spec(megatron_single_rank, tokens, tmp_path, monkeypatch):
    """A mode added to value_residual_spec.MODES alone (new per-layer and model-wide parameter names) builds in
    Megatron, gets gradients there, counts in parameter_counts, and maps to an HF model with the same logits."""
    from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config
    from rf_megatron.flops import parameter_counts
    from rf_megatron.hf import value_residual_spec as spec
    from rf_megatron.hf.export import megatron_logits, megatron_state, write_model_files
    from rf_megatron.hf.weights import hf_to_megatron, megatron_to_hf
    from rf_megatron.model import build_model_chunks

    convex = spec.LambdaMode(
        "convex", "lambda1_n = sigmoid(z)_n, lambda2_n = g_n * (1 - lambda1_n)",
        lambda own, shared, constant: (shared, own["value_residual_gain"][0] * (1 - shared)),
        layer_params=(spec.Param("value_residual_gain", lambda n: 1, lambda n: 1.0),),
        model_params=(spec.Param("value_residual_mix_logits", lambda n: n, lambda n: 0.0),),
        shared_values=lambda p: torch.sigmoid(p["value_residual_mix_logits"]))
    monkeypatch.setitem(spec.MODES, "convex", convex)
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=VOCAB,
                      seq_length=32, variant="resformer", lambda_mode="convex")
    cfg.validate(ParallelConfig())
    torch.manual_seed(0)
    model = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), cpu=True))[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "value_residual" in name:
                p.copy_(p + 0.3 * torch.randn_like(p))
    seq = tokens.shape[1]
    model(tokens, torch.arange(seq).expand(tokens.shape[0], -1),
          torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)).float().logsumexp(-1).mean().backward()
    lambdas = {n: p for n, p in model.named_parameters() if "value_residual" in n}
    assert sorted(lambdas) == ["decoder.layers.1.self_attention.value_lambdas.value_residual_gain",
                               "decoder.layers.2.self_attention.value_lambdas.value_residual_gain",
                               "value_residual_plus.value_residual_mix_logits"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lambdas.values())
    assert parameter_counts(cfg).total == sum(p.numel() for p in model.parameters())
    model.eval()
    state = megatron_state(model)
    hf_state = megatron_to_hf(state, cfg)
    write_model_files(tmp_path, hf_state, cfg, {"bos": 2, "eos": 3, "pad": 0}, "fp32", 10**9)
    from rf_megatron.hf.modeling_rfgpt import RFGPTForCausalLM  # the package's classes read the patched MODES

    hf = RFGPTForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(tokens).logits - megatron_logits(model, tokens)).abs().max().item() <= 1e-4
    back = hf_to_megatron(hf_state, cfg)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("case", [
    dict(variant="vanilla", qk_layernorm=True),
    dict(variant="vanilla", untie_embeddings_and_output_weights=False),
    dict(variant="resformer", lambda_mode="sparse", num_query_groups=2, qk_layernorm=True,
         untie_embeddings_and_output_weights=False, rotary_base=500000),
], ids=["vanilla_qk_norm", "vanilla_tied", "sparse_gqa_qk_norm_tied"])
def test_qk_layernorm_and_tied_embeddings_match_megatron(case, megatron_single_rank, tokens, tmp_path):
    """Options the trained checkpoints above do not use, through the same mapping (no checkpoint)."""
    from rf_megatron.config import ModelConfig, ParallelConfig, build_transformer_config
    from rf_megatron.hf.export import megatron_logits, megatron_state, write_model_files
    from rf_megatron.hf.weights import hf_to_megatron, megatron_to_hf
    from rf_megatron.model import build_model_chunks

    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=VOCAB,
                      seq_length=32, **case)
    torch.manual_seed(0)
    model = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), cpu=True))[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand_like(p))
    model.eval()
    state = megatron_state(model)
    hf_state = megatron_to_hf(state, cfg)
    assert ("lm_head.weight" in hf_state) == cfg.untie_embeddings_and_output_weights
    write_model_files(tmp_path, hf_state, cfg, {"bos": 2, "eos": 3, "pad": 0}, "fp32", 10**9)
    hf = load_hf(tmp_path)
    with torch.no_grad():
        diff = (hf(tokens).logits - megatron_logits(model, tokens)).abs().max().item()
    assert diff <= 1e-4
    back = hf_to_megatron(hf_state, cfg)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_folder_contents_tokenizer_and_model_card(exported, data):
    import sentencepiece as spm
    from transformers import AutoTokenizer, GenerationConfig

    folder, _ = exported["learnable"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((folder / s).exists() for s in shards)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "rfgpt" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_rfgpt.RFGPTForCausalLM"
    assert (config["variant"], config["lambda_mode"], config["num_key_value_heads"]) == ("resformer", "learnable", 4)
    assert GenerationConfig.from_pretrained(str(folder)).eos_token_id == 3
    tok = AutoTokenizer.from_pretrained(str(folder))
    sp = spm.SentencePieceProcessor(model_file=str(data / "tok.model"))
    for text in ("the king  spoke\nto thee, fair lady!", " leading space", "Ünïcödé 🙂 bytes"):
        ids = tok(text)["input_ids"]
        assert ids == sp.encode(text) and tok.decode(ids) == text
    card = (folder / "README.md").read_text()
    model = load_hf(folder)
    lam = model.model.layers[1].self_attn.value_residual_lambdas.detach()
    assert f"| 2 | {lam[0]:.4f} | {lam[1]:.4f} |" in card and "learnable" in card and "TP2 x PP2" in card
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # nothing half-written left


def test_cli_bf16_export_verifies_against_megatron(trained, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "svf_bf16"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint_to_hf.py"), "--checkpoint",
                           trained["svformer_gqa"] / "iter_0000002", "--output", out, "--dtype", "bf16"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: max |HF - Megatron| logits" in proc.stdout
    shard = next(out.glob("model-*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.k_proj.weight").dtype == torch.bfloat16
        assert "model.layers.1.self_attn.v_proj.weight" not in f.keys()  # SVFormer: no V after layer 1


@pytest.mark.parametrize("variant,dtype,shard", [("learnable", "fp32", "100KB"), ("svformer_gqa", "bf16", "60KB")])
def test_streamed_shards_hold_what_the_in_memory_mapping_of_the_loaded_model_writes(
        variant, dtype, shard, trained, megatron_single_rank, tmp_path):
    """The streaming export (one layer at a time, headers planned from metadata) against the whole TP1 model
    loaded by Megatron and mapped in memory: the same shard files, each with the same tensors, bit for bit."""
    from safetensors.torch import load_file

    from rf_megatron.hf import export as ex
    from rf_megatron.hf.safetensors_io import INDEX, parse_size, save_sharded
    from rf_megatron.hf.weights import megatron_to_hf

    streamed = ex.export(trained[variant], tmp_path / "streamed", dtype=dtype, max_shard_size=shard, verify="none",
                         log=lambda *_: None)
    it = ex.resolve_checkpoint(trained[variant])
    cfg = ex.read_run_config(it)
    with ex.megatron_single_process():
        state = ex.megatron_state(ex.load_megatron_model(it, cfg))
    hf = {name: t.to(ex.DTYPES[dtype]) for name, t in megatron_to_hf(state, cfg.model).items()}
    (tmp_path / "in_memory").mkdir()
    files = save_sharded(hf, tmp_path / "in_memory", parse_size(shard))
    assert len(files) >= 3 and sorted(p.name for p in streamed.glob("*.safetensors")) == sorted(files)
    for file in files:
        got, want = load_file(str(streamed / file)), load_file(str(tmp_path / "in_memory" / file))
        assert sorted(got) == sorted(want), file
        assert all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in want), file
    assert (json.loads((streamed / INDEX).read_text())
            == json.loads((tmp_path / "in_memory" / INDEX).read_text()))


def test_weights_only_export_verified_by_reading_back_names_a_corrupt_tensor(trained, tmp_path):
    """--verify weights (what --verify auto picks above 1B parameters) and --no-tokenizer, through the CLI; then
    one flipped byte in a written shard is caught and named."""
    from rf_megatron.hf import export as ex
    from rf_megatron.hf.dist_tensors import DistCheckpointTensors
    from rf_megatron.hf.safetensors_io import INDEX

    out = tmp_path / "weights_only"
    proc = run_tool("convert_checkpoint_to_hf.py", "--checkpoint", trained["svformer_gqa"], "--output", out,
                    "--verify", "weights", "--no-tokenizer", "--max-shard-size", "60KB")
    assert "no tokenizer: writing the weights alone" in proc.stdout
    count = len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert f"wrote {count}/{count} tensors" in proc.stdout and f"verified: {count} tensors read back" in proc.stdout
    assert not list(out.glob("tokenizer*")) and not (out / "special_tokens_map.json").exists()
    assert "not included (weights-only export)" in (out / "README.md").read_text()
    assert type(load_hf(out)).__name__ == "RFGPTForCausalLM"

    it = ex.resolve_checkpoint(trained["svformer_gqa"])
    cfg = ex.read_run_config(it)
    tensors = DistCheckpointTensors(it)
    _, from_global = ex.plan_hf_tensors(tensors, cfg.model, torch.float32)
    name = "model.layers.2.self_attn.o_proj.weight"
    shard = out / json.loads((out / INDEX).read_text())["weight_map"][name]
    blob = bytearray(shard.read_bytes())
    header_len = int.from_bytes(blob[:8], "little")
    start = json.loads(blob[8:8 + header_len])[name]["data_offsets"][0]
    blob[8 + header_len + start + 6] ^= 0x10
    shard.write_bytes(bytes(blob))
    with pytest.raises(ex.ConversionError, match=f"{name} in {shard.name} differs from the checkpoint"):
        ex.verify_weights(out, tensors, cfg.model, from_global)


# --------------------------------------------------------------------------------------------------
# HF -> checkpoint -> HF, and the trainer resuming from it
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def round_trips(exported, tmp_path_factory):
    """variant -> (converted checkpoint root, re-exported HF folder); the import uses TP1 x PP2 x VPP2."""
    from rf_megatron.hf.export import export
    from rf_megatron.hf.import_hf import import_hf

    out, result = tmp_path_factory.mktemp("roundtrip"), {}
    for name in ("learnable_plus", "svformer_gqa"):
        ckpt = import_hf(exported[name][0], out / f"{name}_ckpt", tp=1, pp=2, vpp=2, log=lambda *_: None)
        back = export(ckpt, out / f"{name}_hf", verify=False, log=lambda *_: None)
        result[name] = (ckpt, back)
    return result


@pytest.fixture(scope="module")
def foreign_llama(tmp_path_factory):
    """A Llama saved by transformers itself (tied embeddings, GQA, one model.safetensors, no tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama") / "tiny-llama"
    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 max_position_embeddings=128, rms_norm_eps=1e-6,
                                 rope_parameters={"rope_type": "default", "rope_theta": 50000.0})).save_pretrained(folder)
    return folder


@pytest.mark.mcore_api
@pytest.mark.parametrize("variant", ["learnable_plus", "svformer_gqa"])
def test_round_trip_hf_checkpoint_hf_is_identical(variant, exported, round_trips):
    from rf_megatron.hf.safetensors_io import load_hf_weights

    import yaml

    ckpt, back = round_trips[variant]
    state = json.loads((ckpt / "iter_0000000" / "train_state.json").read_text())
    assert (state["step"], state["consumed_samples"]) == (0, 0)
    parallel = yaml.safe_load((ckpt / "iter_0000000" / "run_config.yaml").read_text())["parallel"]
    assert (parallel["tensor_parallel"], parallel["pipeline_parallel"], parallel["virtual_pipeline_parallel"]) == (1, 2, 2)
    from rf_megatron.hf.dist_tensors import DistCheckpointTensors

    keys = DistCheckpointTensors(ckpt / "iter_0000000").metadata.state_dict_metadata
    assert state["weights_only"] and not [k for k in keys if k.startswith(("optimizer", "rng_state"))]  # no Adam zeros
    assert (ckpt / "latest").read_text() == "iter_0000000" and (ckpt / "tokenizer.model").exists()
    want, got = load_hf_weights(exported[variant][0]), load_hf_weights(back)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert json.loads((back / "config.json").read_text()) == json.loads((exported[variant][0] / "config.json").read_text())


@pytest.mark.mcore_api
def test_streamed_import_writes_the_keys_shapes_dtypes_and_values_the_trainer_saved(trained, exported, tmp_path):
    """Every variant: the trainer's TP2 x PP2 checkpoint -> HF -> the streamed import (no model built) holds the
    same model keys (tensors and Megatron's _extra_state objects), global shapes, dtypes and values as the
    trainer's own checkpoint, so Megatron loads it wherever it loads the trainer's."""
    from rf_megatron.hf.dist_tensors import NOT_MODEL, DistCheckpointTensors
    from rf_megatron.hf.import_hf import import_hf

    for variant, root in trained.items():
        said = []
        ckpt = import_hf(exported[variant][0], tmp_path / variant, tp=2, pp=2, log=said.append)
        # the way to train on it is a launch of TP x PP = 4 processes (a plain python launch is refused)
        assert said[-1].endswith(f"resume with python -m rf_megatron.launch --nproc-per-node 4 pretrain/pretrain_resformer.py"
                                 f" --config {ckpt}/iter_0000000/run_config.yaml data.paths=[...]"), said[-1]
        want = DistCheckpointTensors(root / (root / "latest").read_text())
        got = DistCheckpointTensors(ckpt / "iter_0000000")
        model_keys = lambda t: {k for k in t.metadata.state_dict_metadata if not k.startswith(NOT_MODEL)}
        assert model_keys(got) == model_keys(want), variant
        for key, md in want.entries.items():
            assert (got.entries[key].size, got.entries[key].properties.dtype) == (md.size, md.properties.dtype), key
            layers = range(md.size[0]) if key in want.stacked else [None]
            for layer in layers:
                assert torch.equal(got.read(key, layer), want.read(key, layer)), (variant, key, layer)


def test_import_verification_reads_back_and_names_a_tensor_written_wrong(exported, tmp_path, monkeypatch):
    """A writer that gets one tensor wrong (here: the mapping perturbed for one layer) is caught by reading every
    written tensor back against the HF weights; nothing is published."""
    from rf_megatron.hf.import_hf import MegatronTensorsFromHF, import_hf
    from rf_megatron.hf.weights import ConversionError

    right = MegatronTensorsFromHF.tensor

    def wrong(self, name):
        tensor = right(self, name)
        return tensor + 1e-3 if name == "decoder.layers.2.mlp.linear_fc2.weight" else tensor

    monkeypatch.setattr(MegatronTensorsFromHF, "tensor", wrong)
    with pytest.raises(ConversionError, match=r"verification failed: model\.layers\.2\.mlp\.down_proj\.weight reads back"):
        import_hf(exported["learnable"][0], tmp_path / "ckpt", log=lambda *_: None)
    assert not (tmp_path / "ckpt").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_conversion_removes_what_killed_conversions_left_and_keeps_a_running_ones(exported, tmp_path):
    """A converter killed with -9 leaves its temp folders (a 70B import: 140 GB); the next conversion to the same
    output removes those whose process is gone and keeps one whose process still runs."""
    from rf_megatron.hf.export import export
    from rf_megatron.hf.import_hf import import_hf

    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()  # SIGKILL
    killed.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for output in (tmp_path / "ckpt", tmp_path / "hf"):
            dead = [tmp_path / f".{output.name}.{kind}-{killed.pid}" for kind in ("tmp", "work")]
            alive = tmp_path / f".{output.name}.tmp-{running.pid}"
            for folder in dead + [alive]:
                (folder / "iter_0000000.tmp").mkdir(parents=True)
            said = []
            if output.name == "ckpt":
                import_hf(exported["vanilla"][0], output, log=said.append)
            else:
                export(tmp_path / "ckpt", output, verify=False, log=said.append)
            assert not any(folder.exists() for folder in dead) and alive.exists(), output
            assert [line for line in said if "left by an interrupted conversion" in line] == [
                f"removed {folder} (left by an interrupted conversion)" for folder in dead]
            assert output.exists() and not (tmp_path / f".{output.name}.tmp-{os.getpid()}").exists()
    finally:
        running.kill()
        running.wait()


def test_an_output_that_a_killed_force_replacement_moved_aside_comes_back(exported, trained, tmp_path):
    """`--force` moves the old output to .NAME.old-PID, then renames the new one in: a kill between the two leaves
    no output. The next conversion puts the old one back (and, without --force, refuses to replace it); where the
    new output did get in, the moved-aside copy is removed."""
    from rf_megatron.hf.export import export
    from rf_megatron.hf.weights import ConversionError

    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    output, aside = tmp_path / "hf", tmp_path / f".hf.old-{killed.pid}"
    shutil.copytree(exported["vanilla"][0], aside)
    said = []
    with pytest.raises(ConversionError, match="exists"):
        export(trained["identity"], output, verify=False, log=said.append)
    assert json.loads((output / "config.json").read_text())["model_type"] == "llama" and not aside.exists()
    assert said == [f"restored {output} from {aside} (a --force replacement was interrupted before the new one "
                    "was in)"]
    shutil.copytree(exported["vanilla"][0], aside)  # the kill came after the new output was in: a stale copy
    export(trained["identity"], output, verify=False, force=True, log=said.append)
    assert not aside.exists() and json.loads((output / "config.json").read_text())["model_type"] == "rfgpt"


def test_foreign_llama_round_trip_with_tied_embeddings(foreign_llama, data, tmp_path):
    """transformers' own Llama folder -> TP1 x PP2 checkpoint (the last stage holds the tied output
    copy) -> HF: same tensors, same config essentials, native LlamaForCausalLM again."""
    from rf_megatron.hf.export import export
    from rf_megatron.hf.import_hf import import_hf
    from rf_megatron.hf.safetensors_io import load_hf_weights

    ckpt = import_hf(foreign_llama, tmp_path / "ckpt", tp=1, pp=2, overrides=["model.seq_length=64"],
                     log=lambda *_: None)
    back = export(ckpt, tmp_path / "hf", tokenizer=str(data / "tok.model"), log=lambda *_: None)  # verifies
    want, got = load_hf_weights(foreign_llama), load_hf_weights(back)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    a, b = json.loads((foreign_llama / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key in ("model_type", "architectures", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps",
                "rope_parameters", "intermediate_size"):
        assert a[key] == b[key], key
    model = load_hf(back)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_trainer_resumes_from_converted_checkpoint(round_trips, data, tmp_path):
    """The converted TP1 x PP2 x VPP2 checkpoint resumes in the trainer (here as TP2), optimizer fresh."""
    ckpt, _ = round_trips["learnable_plus"]
    shutil.copytree(ckpt, tmp_path / "ckpt")
    proc = torchrun(TRAIN, 2, "--config", ckpt / "iter_0000000" / "run_config.yaml", f"data.paths=[{data / 'corpus'}]",
                    f"data.cache_dir={data / 'cache'}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                    f"logging.dir={tmp_path / 'log'}", "parallel.tensor_parallel=2", "parallel.pipeline_parallel=1",
                    "parallel.virtual_pipeline_parallel=null", timeout=600)
    assert "at step 0 (0 samples consumed); weights only (an HF import)" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    losses = [r["last_loss"] for r in rows if "last_loss" in r]
    assert len(losses) == 2 and all(l == l and l < 7 for l in losses)
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000002"


def test_a_weights_only_checkpoint_trains_bf16_with_the_distributed_optimizer_from_its_own_weights(
        round_trips, data, tmp_path):
    """The optimizer built fresh for a weights-only checkpoint keeps fp32 main copies of the weights: they must be
    re-read after the load (Megatron-LM's --finetune does the same), or the first step writes the init back. One
    step at lr 1e-9, then the saved weights still equal the imported ones (to bf16 rounding)."""
    from rf_megatron.hf.dist_tensors import DistCheckpointTensors

    ckpt, _ = round_trips["svformer_gqa"]
    shutil.copytree(ckpt, tmp_path / "ckpt")
    proc = torchrun(TRAIN, 2, "--config", ckpt / "iter_0000000" / "run_config.yaml", f"data.paths=[{data / 'corpus'}]",
                    f"data.cache_dir={data / 'cache'}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                    f"logging.dir={tmp_path / 'log'}", "parallel.pipeline_parallel=1",
                    "parallel.virtual_pipeline_parallel=null", "parallel.params_dtype=bf16",
                    "parallel.distributed_optimizer=true", "optim.lr=1e-9", "optim.min_lr=0", "optim.lr_warmup_steps=0",
                    "train.train_steps=1",
                    timeout=600)
    assert "weights only (an HF import)" in proc.stdout
    assert "LR schedule follows" not in proc.stdout  # a fresh schedule: nothing of the import's changed
    before = DistCheckpointTensors(ckpt / "iter_0000000")
    after = DistCheckpointTensors(tmp_path / "ckpt" / "iter_0000001")
    for i in range(LAYERS):
        want, got = before.read_layer(i), after.read_layer(i)
        assert sorted(got) == sorted(want)
        for name in want:
            assert (got[name].float() - want[name]).norm() <= 0.01 * want[name].norm(), (i, name)


# --------------------------------------------------------------------------------------------------
# The HF model: cache, attention backends, gradient checkpointing, init
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["learnable_plus", "svformer_gqa"])
def test_generate_with_cache_equals_without(variant, exported, data):
    from transformers import AutoTokenizer

    folder, _ = exported[variant]
    model = load_hf(folder)
    prompt = AutoTokenizer.from_pretrained(str(folder))("the king spoke to the fair lady", return_tensors="pt")
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, return_dict_in_generate=True, **kwargs)
        plain = model.generate(**prompt, use_cache=False, **kwargs)
    assert cached.sequences.shape[1] == prompt["input_ids"].shape[1] + 32
    assert torch.equal(cached.sequences, plain)
    cache_type = type(cached.past_key_values).__name__
    assert cache_type == ("SharedValueCache" if variant.startswith("svformer") else "DynamicCache")
    # any other cache works too (SVFormer then stores a copy of V_1 per layer: correct, no saving)
    from transformers import DynamicCache

    ids = cached.sequences
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        head = model(ids[:, :10], past_key_values=cache, use_cache=True).logits
        tail = model(ids[:, 10:], past_key_values=cache, use_cache=True).logits
    assert (torch.cat([head, tail], 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", ["learnable_plus", "svformer_gqa"])
def test_sdpa_equals_eager(variant, exported, tokens):
    """(flex_attention goes through the same interface, but torch's CPU inductor kernel is slow to
    compile and fails for some shapes here: a torch issue, not tested.)"""
    folder, _ = exported[variant]
    eager = load_hf(folder, attn_implementation="eager")
    kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want_logits, want_ids = eager(tokens).logits, eager.generate(tokens[:, :8], **kwargs)
    for backend in ("sdpa",):
        model = load_hf(folder, attn_implementation=backend)
        assert model.config._attn_implementation == backend
        with torch.no_grad():
            assert (model(tokens).logits - want_logits).abs().max().item() < 1e-5, backend
            assert torch.equal(model.generate(tokens[:, :8], **kwargs), want_ids), backend


@pytest.mark.parametrize("variant", ["learnable_plus", "svformer_gqa"])
def test_gradient_checkpointing_gives_the_same_gradients(variant, exported, tokens):
    folder, _ = exported[variant]
    model = load_hf(folder).train()
    grads = []
    for checkpointing in (False, True):
        (model.gradient_checkpointing_enable if checkpointing else model.gradient_checkpointing_disable)()
        model.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() == dict(model.named_parameters()).keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-7), name
    # V_1's residual gradient reaches layer 1's value projection (and the lambdas) under checkpointing
    assert grads[1]["model.layers.0.self_attn.v_proj.weight"].abs().sum() > 0


def test_init_weights_of_the_lambdas():
    from rf_megatron.hf.configuration_rfgpt import RFGPTConfig
    from rf_megatron.hf.modeling_rfgpt import RFGPTForCausalLM

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2)
    plus = RFGPTForCausalLM(RFGPTConfig(lambda_mode="learnable_plus", **shape))
    assert plus.model.value_residual_logits.tolist() == [0.0] * 3 and plus.model.value_residual_scale.tolist() == [3.0]
    assert all(layer.self_attn.value_residual_lambda2.tolist() == [0.5] for layer in plus.model.layers[1:])
    learn = RFGPTForCausalLM(RFGPTConfig(lambda_mode="learnable", **shape))
    assert learn.model.layers[0].self_attn.value_residual_lambdas is None
    assert all(layer.self_attn.value_residual_lambdas.tolist() == [0.5, 0.5] for layer in learn.model.layers[1:])
    sv = RFGPTForCausalLM(RFGPTConfig(variant="svformer", **shape))
    assert sv.model.layers[0].self_attn.v_proj is not None and all(
        layer.self_attn.v_proj is None for layer in sv.model.layers[1:])


def test_svformer_cache_holds_one_layer_of_values(exported):
    """Same shape, same prompt + generation: SVFormer's cache is (L+1)/(2L) of a vanilla Llama's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rf_megatron.hf.modeling_rfgpt import cache_nbytes

    svformer = load_hf(exported["svformer_gqa"][0])
    c = svformer.config
    vanilla = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rope_parameters=c.rope_parameters)).eval()
    prompt = torch.randint(4, 300, (3, 20), generator=torch.Generator().manual_seed(3))
    caches = {}
    for name, model in (("svformer", svformer), ("vanilla", vanilla)):
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 return_dict_in_generate=True, pad_token_id=0)
        caches[name] = out.past_key_values
    # (the model's classes come from the folder's modeling_rfgpt.py, a different module object)
    assert type(caches["svformer"]).__name__ == "SharedValueCache" and caches["svformer"].get_seq_length() == 31
    L = svformer.config.num_hidden_layers
    one_layer_kv = 3 * 2 * 31 * 16 * 4  # batch x KV heads x tokens x head dim x fp32
    assert cache_nbytes(caches["vanilla"]) == 2 * L * one_layer_kv
    assert cache_nbytes(caches["svformer"]) == (L + 1) * one_layer_kv
    assert cache_nbytes(caches["svformer"]) / cache_nbytes(caches["vanilla"]) == (L + 1) / (2 * L)


# --------------------------------------------------------------------------------------------------
# Tokenizer and one-line errors
# --------------------------------------------------------------------------------------------------
def test_unigram_tokenizer_converts_too(data, tmp_path):
    import sentencepiece as spm

    from rf_megatron.hf.tokenizer import check_equivalent, save_hf_tokenizer

    lines = [json.loads(line)["text"] for line in open(data / "corpus.jsonl")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "uni"),
                                   vocab_size=300, model_type="unigram", byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", minloglevel=2)
    hf, ids = save_hf_tokenizer(tmp_path / "uni.model", tmp_path / "hf")
    assert ids == {"bos": 2, "eos": 3, "pad": 0, "unk": 1}
    check_equivalent(tmp_path / "uni.model", hf, [line[:300] for line in lines[:40]] + ["  x\n\ny 🙂"])


def _iter_copy(trained, tmp_path, name="identity"):
    src = trained[name] / "iter_0000002"
    dst = tmp_path / "ckpt" / "iter_0000002"
    shutil.copytree(src, dst)
    (tmp_path / "ckpt" / "latest").write_text("iter_0000002")
    return dst


def _error_of(capsys, tool, *args):
    code = tool.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_export_errors_are_one_line(trained, tmp_path, capsys):
    tool = _tool("convert_checkpoint_to_hf")
    out = tmp_path / "out"
    it = _iter_copy(trained, tmp_path)
    (it / "train_state.json").rename(it / "train_state.json.bak")
    assert "incomplete checkpoint" in _error_of(capsys, tool, "--checkpoint", it.parent, "--output", out)
    (it / "train_state.json.bak").rename(it / "train_state.json")
    (it / "__1_0.distcp").unlink()
    assert "missing __1_0.distcp" in _error_of(capsys, tool, "--checkpoint", it, "--output", out)
    (it.parent / "latest").write_text("iter_0000009")
    assert "names iter_0000009" in _error_of(capsys, tool, "--checkpoint", it.parent, "--output", out)
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint root" in _error_of(capsys, tool, "--checkpoint", tmp_path / "empty", "--output", out)

    import yaml

    it = _iter_copy(trained, tmp_path / "b")
    config = (it / "run_config.yaml").read_text()

    def edit(section, key, value):
        tree = yaml.safe_load(config)
        tree[section][key] = value
        (it / "run_config.yaml").write_text(yaml.safe_dump(tree))

    edit("model", "variant", "hyperformer")
    assert "unknown variant 'hyperformer'" in _error_of(capsys, tool, "--checkpoint", it, "--output", out)
    edit("data", "tokenizer_model", str(tmp_path / "gone.model"))
    assert "missing tokenizer" in _error_of(capsys, tool, "--checkpoint", it, "--output", out)
    out.mkdir()
    (it / "run_config.yaml").write_text(config)
    assert "exists (pass --force" in _error_of(capsys, tool, "--checkpoint", it, "--output", out)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_an_import_of_a_folder_without_tokenizer_says_so_and_names_no_foreign_tokenizer(exported, tmp_path, capsys):
    import yaml

    tool = _tool("convert_hf_to_checkpoint")
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(exported["vanilla"][0], folder, ignore=shutil.ignore_patterns("tokenizer*"))
    config = folder / "config.json"
    config.write_text(config.read_text()[:-20])  # cut off mid-object
    assert f"{config}: not valid JSON" in _error_of(capsys, tool, "--hf", folder, "--output", tmp_path / "o")
    shutil.copy(exported["vanilla"][0] / "config.json", config)
    assert tool.main(["--hf", str(folder), "--output", str(tmp_path / "o"), "--verify", "none"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {folder} has no tokenizer.model" in out and "pass data.tokenizer_model=" in out, out
    run_config = yaml.safe_load((tmp_path / "o" / "iter_0000000" / "run_config.yaml").read_text())
    assert run_config["data"]["tokenizer_model"] is None


def test_import_errors_are_one_line(exported, tmp_path, capsys):
    tool = _tool("convert_hf_to_checkpoint")
    assert "no config.json" in _error_of(capsys, tool, "--hf", tmp_path, "--output", tmp_path / "o")
    folder = tmp_path / "gpt2"
    shutil.copytree(exported["vanilla"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert "model_type='gpt2'" in _error_of(capsys, tool, "--hf", folder, "--output", tmp_path / "o")
    assert "does not divide" in _error_of(capsys, tool, "--hf", exported["vanilla"][0], "--output", tmp_path / "o",
                                          "--tp", "3")
    assert "unknown option train.train_stepz" in _error_of(capsys, tool, "--hf", exported["vanilla"][0], "--output",
                                                            tmp_path / "o", "train.train_stepz=5")
    from safetensors.torch import save_file

    from rf_megatron.hf.safetensors_io import load_hf_weights

    weights = load_hf_weights(exported["vanilla"][0])
    broken = {"missing": {k: v for k, v in weights.items() if k != "model.layers.3.mlp.up_proj.weight"},
              "extra": {**weights, "model.layers.9.mlp.up_proj.weight": weights["model.layers.3.mlp.up_proj.weight"].clone()},
              "shape": {**weights, "model.layers.2.mlp.down_proj.weight": weights["model.layers.2.mlp.down_proj.weight"][:, :-1]}}
    for name, tensors in broken.items():
        folder = tmp_path / name
        shutil.copytree(exported["vanilla"][0], folder, ignore=shutil.ignore_patterns("model*.safetensors*"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
        broken[name] = _error_of(capsys, tool, "--hf", folder, "--output", tmp_path / "o")
    assert "HF weights have no model.layers.3.mlp.up_proj.weight" in broken["missing"]
    assert "HF tensors with no Megatron counterpart: model.layers.9.mlp.up_proj.weight" in broken["extra"]
    assert ("wrong shape for config.json's model: decoder.layers.2.mlp.linear_fc2.weight (64, 127) (the model has "
            "(64, 128))") in broken["shape"]
    damaged = tmp_path / "damaged"  # real fault injection: a cut-off shard, then a header with flipped bytes
    shutil.copytree(tmp_path / "shape", damaged)
    data = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[:-100])
    assert f"truncated ({len(data) - 100} bytes, its header describes {len(data)})" in _error_of(
        capsys, tool, "--hf", damaged, "--output", tmp_path / "o")
    (damaged / "model.safetensors").write_bytes(data[:8] + b"\xff\xfe" + data[10:])
    assert "not a readable safetensors file (damaged or truncated header)" in _error_of(
        capsys, tool, "--hf", damaged, "--output", tmp_path / "o")
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_exit_code_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint_to_hf.py"), "--checkpoint",
                           tmp_path / "nope", "--output", tmp_path / "out"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: checkpoint {tmp_path / 'nope'}: no such directory"


# --------------------------------------------------------------------------------------------------
# Evaluating an exported folder (tools/evaluate.py): lm-evaluation-harness and held-out perplexity
# --------------------------------------------------------------------------------------------------
EVAL_TASKS = REPO / "tests" / "data" / "eval_tasks"  # rf_tiny_choice: 6 multiple-choice questions, offline


def evaluate_cli(*args):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return proc


def own_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as a causal LM scores it: the pair encoded whole, then split."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_context, len(whole)))


@pytest.mark.parametrize("variant", ["vanilla", "learnable_plus"])
def test_lm_eval_loglikelihoods_equal_the_models_own(variant, exported, tmp_path):
    from transformers import AutoTokenizer

    folder, _ = exported[variant]
    proc = evaluate_cli(folder, "--tasks", "rf_tiny_choice", "--include-path", EVAL_TASKS, "--output", tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n-samples"]["rf_tiny_choice"]["effective"] == 6
    rows = [json.loads(line) for line in (tmp_path / "samples_rf_tiny_choice.jsonl").read_text().splitlines()]
    model, tokenizer = load_hf(folder), AutoTokenizer.from_pretrained(str(folder))
    checked = 0
    for row in rows[:3]:
        for (context, continuation), resp in zip(row["arguments"], row["resps"]):
            assert resp[0][0] == pytest.approx(own_loglikelihood(model, tokenizer, context, continuation), abs=1e-4)
            checked += 1
        best = max(range(len(row["resps"])), key=lambda i: row["resps"][i][0][0])
        assert row["acc"] == float(best == row["target"])
    assert checked == 9
    assert results["results"]["rf_tiny_choice"]["acc,none"] == pytest.approx(sum(r["acc"] for r in rows) / 6)


def test_held_out_perplexity_scores_the_validation_documents_in_windows(exported, data, tmp_path):
    from rf_megatron.indexed_data import split_token_counts, split_tokens

    folder, _ = exported["learnable_plus"]
    proc = evaluate_cli(folder, "--perplexity", data / "corpus", "--split", "90,10,0", "--seq-length", 32,
                        "--max-tokens", 90, "--output", tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "perplexity.json").read_text())
    held_out = split_tokens(data / "corpus", (90, 10, 0), part=1)
    assert split_token_counts(data / "corpus", (90, 10, 0))[1][1] == len(held_out) > 90
    model, nll = load_hf(folder), 0.0
    for begin, end in ((0, 32), (32, 64), (64, 90)):  # three windows, the last shorter (padded in the batch)
        nll -= own_loglikelihood_of_ids(model, [int(t) for t in held_out[begin:end]])
    assert got["tokens"] == 31 + 31 + 25 and got["windows"] == 3
    assert got["loss"] == pytest.approx(nll / 87, abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / 87), rel=1e-5)


def test_perplexity_of_the_models_own_training_data_scores_its_held_out_part(exported, data, tmp_path):
    """Without --split, the dataset the model trained on was scored whole: mostly documents it trained on, with no
    word said. Now its run config's data.split cuts it (said in a note), and a different --split is noted."""
    folder, _ = exported["learnable_plus"]
    common = ("--seq-length", 32, "--max-tokens", 90)
    proc = evaluate_cli(folder, "--perplexity", data / "corpus", *common, "--output", tmp_path / "auto")
    assert proc.returncode == 0, proc.stderr
    assert (f"note: {data / 'corpus'} is this model's training data (data.paths of its run config): scoring the "
            "valid part of its data.split 90,10,0, the documents it did not train on (--split 100,0,0 --part train: "
            "all of it)") in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    explicit = evaluate_cli(folder, "--perplexity", data / "corpus", "--split", "90,10,0", *common,
                            "--output", tmp_path / "explicit")
    assert explicit.returncode == 0 and "note:" not in explicit.stdout + explicit.stderr, explicit.stderr
    got, want = (json.loads((tmp_path / d / "perplexity.json").read_text()) for d in ("auto", "explicit"))
    assert got["loss"] == want["loss"] and got["tokens"] == want["tokens"]
    other = evaluate_cli(folder, "--perplexity", data / "corpus", "--split", "80,20,0", "--seq-length", 4096,
                         "--max-tokens", 90, "--output", tmp_path / "other")
    assert other.returncode == 0 and ("note: this model trained with data.split 90,10,0: --split 80,20,0 cuts "
                                      "differently, so part of what it scores was trained on") in other.stdout, other.stdout
    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    assert (f"note: --seq-length 4096 is beyond the {context} positions the model trained with: a score of positions "
            "it never saw") in other.stdout, other.stdout


def own_loglikelihood_of_ids(model, ids) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))


def test_perplexity_of_a_text_file_reports_bits_per_byte(exported, tmp_path):
    from transformers import AutoTokenizer

    folder, _ = exported["vanilla"]
    text = "the king spoke to the fair lady and the noble lord"
    (tmp_path / "notes.txt").write_text(text + "\n")
    proc = evaluate_cli(folder, "--perplexity", tmp_path / "notes.txt", "--output", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "eval" / "perplexity.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []  # a document ends with EOS
    ids = tokenizer(text + "\n", add_special_tokens=False)["input_ids"] + eos  # a text file's line keeps its newline
    nll = -own_loglikelihood_of_ids(load_hf(folder), ids)
    assert got["tokens"] == len(ids) - 1
    assert got["nll_sum"] == pytest.approx(nll, abs=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len((text + "\n").encode()), rel=1e-5)


def test_evaluate_errors_are_one_line(exported, tmp_path):
    folder, _ = exported["vanilla"]
    for args, message in (
            ((tmp_path, "--tasks", "x"), "no config.json"),
            ((folder, "--tasks", "no_such_task_xyz"), "unknown task(s) no_such_task_xyz"),
            ((folder, "--perplexity", tmp_path / "missing"), "no such file, and no indexed dataset"),
            ((folder, "--perplexity", tmp_path / "missing", "--split", "1,2"), "three non-negative weights")):
        proc = evaluate_cli(*args)
        assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and message in proc.stderr, args
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("tool", ["convert_checkpoint_to_hf.py", "convert_hf_to_checkpoint.py", "evaluate.py"])
def test_help_shows_only_defaults_worth_showing_and_whole_sentences(tool):
    """No `(default: True)` after a flag, no `(default: None)` after a help that says the default itself, and a
    description that does not stop mid-sentence."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(default: None)" not in proc.stdout and "(default: True)" not in proc.stdout, proc.stdout
    description = " ".join(proc.stdout.split("\n\n")[1].split())
    assert description.endswith("."), description
