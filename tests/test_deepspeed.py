"""pretrain/pretrain_hf_deepspeed.py: the HF-format model trained with DeepSpeed ZeRO (real 2-process
gloo runs on DeepSpeed's CPU accelerator), checked against the Megatron trainer on the same initial
weights and data; resume; Megatron -> HF -> DeepSpeed fine-tune -> HF; one-line errors.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_diverged_at_step_3, build_tiny_corpus, free_port, torchrun

pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")

DS = REPO / "pretrain" / "pretrain_hf_deepspeed.py"
MEGATRON = REPO / "pretrain" / "pretrain_resformer.py"
STEPS = 6
MODELS = {
    "learnable": {"model.variant": "resformer", "model.lambda_mode": "learnable", "train.lambda_log_interval": 3},
    "svformer_gqa": {"model.variant": "svformer", "model.num_query_groups": 2},
}


def overrides(data, run_dir, **extra):
    base = {
        "model.num_layers": 3, "model.hidden_size": 64, "model.num_attention_heads": 4, "model.ffn_hidden_size": 160,
        "model.vocab_size": 320, "model.seq_length": 32,
        "train.train_steps": STEPS, "train.global_batch_size": 8, "train.micro_batch_size": 2,
        "train.log_interval": 1, "train.eval_interval": 0, "train.eval_steps": 2, "train.lambda_log_interval": 0,
        "train.final_eval_full": "false",  # both engines score the same sample (an imported run config has no preset)
        "optim.lr": 0.003, "optim.min_lr": 0.0003, "optim.lr_warmup_steps": 2,
        "data.paths": f"[{data / 'corpus'}]", "data.tokenizer_model": data / "tok.model", "data.split": "90,10,0",
        "data.cache_dir": data / "cache",
        "logging.dir": run_dir, "logging.wandb_project": "null", "checkpoint.dir": run_dir / "checkpoints",
        "parallel.tensor_parallel": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def rows(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def curve(run_dir, key="last_loss"):
    return {r["step"]: r[key] for r in rows(run_dir) if key in r}


def tool(name, *args):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_corpus(tmp_path_factory.mktemp("ds_data"))


def model_config(variant):
    from rf_megatron.run_config import load_run_config

    keys = {k: v for k, v in (s.split("=", 1) for s in overrides(Path("."), Path("."), **MODELS[variant]))
            if k.startswith("model.")}
    return load_run_config("tiny_cpu", [f"{k}={v}" for k, v in keys.items()]).model


@pytest.fixture(scope="module")
def initial(data, tmp_path_factory):
    """Per variant: an HF folder with freshly initialised weights (the exporter's file writer)."""
    import shutil

    from rf_megatron.hf.export import write_model_files
    from rf_megatron.engines.deepspeed_model import build_fresh, hf_state

    out = {}
    for variant in MODELS:
        folder = tmp_path_factory.mktemp(f"init_{variant}")
        model = model_config(variant)
        write_model_files(folder, hf_state(build_fresh(model, seed=7), model), model, {}, "fp32", 1 << 30)
        shutil.copyfile(data / "tok.model", folder / "tokenizer.model")
        out[variant] = folder
    return out


@pytest.fixture(scope="module")
def megatron_runs(data, initial, tmp_path_factory):
    """The Megatron trainer (1 process, TP1 x PP1) from each initial folder, via convert_hf_to_checkpoint."""
    out = {}
    for variant, folder in initial.items():
        run = tmp_path_factory.mktemp(f"megatron_{variant}")
        args = overrides(data, run, **MODELS[variant])
        tool("convert_hf_to_checkpoint.py", "--hf", folder, "--output", run / "checkpoints", *args)
        torchrun(MEGATRON, 1, "--config", run / "checkpoints" / "iter_0000000" / "run_config.yaml", *args)
        out[variant] = run
    return out


@pytest.mark.parametrize("variant", list(MODELS))
def test_zero2_on_two_processes_follows_the_megatron_loss_curve(variant, data, initial, megatron_runs, tmp_path):
    torchrun(DS, 2, "--deepspeed", "zero2", "--from-hf", initial[variant], *overrides(data, tmp_path, **MODELS[variant]))
    megatron, deepspeed = curve(megatron_runs[variant]), curve(tmp_path)
    assert sorted(deepspeed) == list(range(1, STEPS + 1)) == sorted(megatron)
    assert abs(deepspeed[1] - megatron[1]) < 1e-5  # same weights, same first batch
    for step in megatron:
        assert deepspeed[step] == pytest.approx(megatron[step], rel=0, abs=1e-5), (step, megatron, deepspeed)
    assert megatron[STEPS] < megatron[1] - 0.3  # it learns: the curves are not flat
    print(f"{variant}: max |loss DeepSpeed - Megatron| over {STEPS} steps = "
          f"{max(abs(deepspeed[s] - megatron[s]) for s in megatron):.2e}")
    norms_m, norms_d = curve(megatron_runs[variant], "grad_norm"), curve(tmp_path, "grad_norm")
    for step in norms_m:
        assert norms_d[step] == pytest.approx(norms_m[step], rel=1e-4)
    assert curve(tmp_path, "lr") == pytest.approx(curve(megatron_runs[variant], "lr"), rel=1e-9)
    keys = [sorted(r) for r in rows(megatron_runs[variant])]
    assert [sorted(r) for r in rows(tmp_path)] == keys  # the same JSONL rows, metric for metric
    lambdas_m = [r for r in rows(megatron_runs[variant]) if "lambda1/layer2" in r]
    lambdas_d = [r for r in rows(tmp_path) if "lambda1/layer2" in r]
    assert len(lambdas_m) == (2 if variant == "learnable" else 0) == len(lambdas_d)
    for m, d in zip(lambdas_m, lambdas_d):  # the learned lambdas of steps 3 and 6
        assert d == pytest.approx(m, rel=0, abs=1e-5)
        assert m["lambda1/layer3"] != 0.5  # they did move
    (valid_m,), (valid_d,) = curve(megatron_runs[variant], "valid_loss").values(), curve(tmp_path, "valid_loss").values()
    assert valid_d == pytest.approx(valid_m, rel=0, abs=1e-5)


def test_a_diverging_run_stops_with_one_error_line(data, tmp_path):
    """lr=1e30 blows the weights up at step 2; step 3's gradients are not finite: every rank stops."""
    proc = torchrun(DS, 2, *overrides(data, tmp_path, **{"optim.lr": 1e30, "checkpoint.save_interval": 1}), check=False)
    assert_diverged_at_step_3(proc)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_0000002"  # nothing saved after the blow-up


def test_deepspeed_launcher_with_a_user_json_and_a_fresh_model(data, tmp_path):
    """The `deepspeed` launcher (it passes --local_rank), the user's own DeepSpeed JSON (ZeRO-1, explicit
    values that agree with the run config), a fresh vanilla model from the preset."""
    conf = _write(tmp_path / "ds.json", {"train_batch_size": 8, "gradient_clipping": 1.0,
                                         "zero_optimization": {"stage": 1, "reduce_bucket_size": 1e7}})
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(DS), "--config", "tiny_cpu", "--deepspeed", conf,
           *overrides(data, tmp_path, **{"train.train_steps": 3, "model.variant": "vanilla"})]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-1 on 2 process(es) (cpu, fp32)" in proc.stdout
    assert sorted(curve(tmp_path)) == [1, 2, 3]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # vanilla is a plain Llama, no remote code
    assert not (tmp_path / "hf" / "modeling_rfgpt.py").exists()


# ZeRO-3 in the default tier; ZeRO-2 (the same resume code, DeepSpeed partitions less) in the slow tier
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_resume_reproduces_the_uninterrupted_curve(stage, data, tmp_path):
    args = ["--deepspeed", f"zero{stage}"]
    torchrun(DS, 2, *args, *overrides(data, tmp_path / "full"))
    first = torchrun(DS, 2, *args, *overrides(data, tmp_path / "cut", **{"train.exit_interval": 3}))
    assert "stopped at step 3" in first.stdout
    ckpt = tmp_path / "cut" / "checkpoints"
    assert (ckpt / "latest").read_text() == "iter_0000003"
    state = json.loads((ckpt / "iter_0000003" / "train_state.json").read_text())
    assert len(state.pop("run_id")) == 12  # the run's lineage (pruning keeps to it)
    assert state.pop("health")["finite"] is True  # the steps before it (rf_megatron/checkpoint_health.py)
    assert state == {"engine": "deepspeed", "step": 3, "consumed_samples": 24, "zero_stage": stage, "world_size": 2}
    assert not (tmp_path / "cut" / "hf").exists()  # the HF folder is written when training is done
    second = torchrun(DS, 2, *args, *overrides(data, tmp_path / "cut"))
    assert "resumed from" in second.stdout and "at step 3 (24 samples consumed)" in second.stdout
    full, cut = curve(tmp_path / "full"), curve(tmp_path / "cut")
    assert sorted(cut) == list(range(1, STEPS + 1))
    for step in full:
        assert cut[step] == pytest.approx(full[step], abs=1e-6), (step, full, cut)
    assert curve(tmp_path / "cut", "lr") == curve(tmp_path / "full", "lr")
    assert (tmp_path / "cut" / "hf" / "config.json").exists()


def test_megatron_export_finetune_export_loads_with_automodel(data, megatron_runs, tmp_path):
    """Megatron-trained ResFormer (learnable lambdas) -> HF -> ZeRO-3 fine-tune -> HF -> generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rf_megatron.hf.safetensors_io import load_hf_weights

    exported = tmp_path / "exported"
    tool("convert_checkpoint_to_hf.py", "--checkpoint", megatron_runs["learnable"] / "checkpoints", "--output", exported)
    tuned_dir = tmp_path / "finetune"
    proc = torchrun(DS, 2, "--deepspeed", "zero3", "--from-hf", exported,
                    *overrides(data, tuned_dir, **MODELS["learnable"], **{"train.train_steps": 3, "optim.lr": 0.003,
                                                                          "optim.lr_warmup_steps": 1}))
    assert f"from {exported}" in proc.stdout
    tuned = tuned_dir / "hf"
    assert "wrote" in proc.stdout and str(tuned) in proc.stdout
    before, after = load_hf_weights(exported), load_hf_weights(tuned)
    assert set(before) == set(after)
    assert all(before[k].shape == after[k].shape for k in before)
    assert not torch.equal(before["model.layers.1.self_attn.value_residual_lambdas"],
                           after["model.layers.1.self_attn.value_residual_lambdas"])
    # the first fine-tuning step starts from the exported weights: its loss is the exported model's
    first = curve(tuned_dir)[1]
    assert first < curve(megatron_runs["learnable"])[1] - 0.2  # continues from the trained model
    model = AutoModelForCausalLM.from_pretrained(str(tuned), trust_remote_code=True).eval()
    assert type(model).__name__ == "RFGPTForCausalLM" and model.config.lambda_mode == "learnable"
    tok = AutoTokenizer.from_pretrained(str(tuned), trust_remote_code=True)
    prompt = tok("the king spoke to the", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 12
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:]).strip()
    card = (tuned / "README.md").read_text()
    assert "DeepSpeed ZeRO-3, 2 process(es)" in card and "steps: 3" in card
    logged = [r for r in rows(tuned_dir) if "lambda1/layer2" in r]  # gathered from ZeRO-3 partitions
    assert len(logged) == 1 and logged[0]["lambda1/layer2"] == pytest.approx(
        float(after["model.layers.1.self_attn.value_residual_lambdas"][0]), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# One-line errors, before anything is built
# --------------------------------------------------------------------------------------------------
def _main():
    spec = importlib.util.spec_from_file_location("pretrain_hf_deepspeed", DS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _error(capsys, argv):
    code = _main()(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_config_errors_are_one_line(data, initial, tmp_path, capsys, monkeypatch):
    base = overrides(data, tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "global_batch_size=8 is not divisible by micro_batch_size*data_parallel=2*3" in _error(capsys, base)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cases = [
        (["deepspeed.config=zero9"], "neither a JSON file nor a preset"),
        (["deepspeed.zero_stage=4"], "ZeRO stage 4"),
        ([f"deepspeed.config={_write(tmp_path / 'a.json', {'train_batch_size': 16})}"],
         "train_batch_size=16 but train.global_batch_size=8"),
        ([f"deepspeed.config={_write(tmp_path / 'b.json', {'optimizer': {'type': 'Adam'}})}"],
         "remove its 'optimizer' section"),
        ([f"deepspeed.config={_write(tmp_path / 'c.json', {'gradient_clipping': 0.5})}"],
         "gradient_clipping=0.5 but optim.clip_grad=1.0"),
        ([f"deepspeed.config={_write(tmp_path / 'd.json', {'checkpoint': {'use_node_local_storage': True}})}"],
         "checkpoint.use_node_local_storage is not supported"),
        (["parallel.params_dtype=bf16"], "needs a GPU"),
        (["train.nan_policy=skip"], "nan_policy=skip is not supported"),
        (["parallel.compile_layers=true"], "parallel.compile_layers is the Megatron trainer's option"),
        (["model.init_method_std=2.0"], "the HF config cannot take this model: Validation error for field "
                                        "'initializer_range'"),
        (["model.num_layers=64", "model.hidden_size=4096", "model.num_attention_heads=32", "model.ffn_hidden_size=11008",
          "deepspeed.zero_stage=3"], "the model does not fit: ZeRO-3 on 2 process(es) needs about"),
    ]
    for extra, message in cases:
        assert message in _error(capsys, base + extra), extra


def test_hf_folders_that_are_not_ours_are_refused(data, initial, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("WORLD_SIZE", "1")
    base = overrides(data, tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _error(capsys, ["--from-hf", empty, *base])
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    _write(gpt2 / "config.json", {"model_type": "gpt2", "n_layer": 2})
    assert "is not an rf-megatron / Llama model: config.json: model_type='gpt2'" in _error(capsys, ["--from-hf", gpt2, *base])
    broken = tmp_path / "broken"
    shutil.copytree(initial["learnable"], broken)
    from safetensors.torch import load_file, save_file

    (shard,) = broken.glob("*.safetensors")
    tensors = load_file(str(shard))
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    _write(broken / "model.safetensors.index.json", index)
    err = _error(capsys, ["--from-hf", broken, *base])
    assert "weights do not match" in err and "missing: model.layers.2.mlp.down_proj.weight" in err


def test_checkpoints_of_the_other_engine_or_stage_are_refused(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "iter_0000003").mkdir(parents=True)
    (ckpt / "latest").write_text("iter_0000003")
    state = ckpt / "iter_0000003" / "train_state.json"
    _write(state, {"step": 3, "consumed_samples": 24, "distributed_optimizer": False})  # what Megatron writes
    assert "is a Megatron checkpoint" in _error(capsys, overrides(data, tmp_path / "run"))
    _write(state, {"engine": "deepspeed", "step": 3, "consumed_samples": 24, "zero_stage": 2, "world_size": 2})
    assert "saved with zero_stage=2, this run has 3" in _error(capsys, ["--zero-stage", "3", *overrides(data, tmp_path / "run")])
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "saved with world_size=2, this run has 1" in _error(capsys, overrides(data, tmp_path / "run"))
    # and the Megatron trainer refuses the DeepSpeed checkpoint with one line
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RF_MEGATRON_CPU": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(MEGATRON), *overrides(data, tmp_path / "run")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is a deepspeed checkpoint: resume it with pretrain/pretrain_hf_deepspeed.py" in proc.stderr


def test_slurm_preflight_checks_the_deepspeed_config(data, tmp_path):
    """slurm/check_config.py --engine deepspeed: TP/PP of the preset do not matter, the ZeRO config does."""
    def check(*args):
        return subprocess.run([sys.executable, str(REPO / "slurm" / "check_config.py"), *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    base = overrides(data, tmp_path, **{"parallel.tensor_parallel": 4})
    ok = check("--world-size", 2, "--engine", "deepspeed", "tiny_cpu", *base)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stderr
    megatron = check("--world-size", 2, "tiny_cpu", *base)  # TP4 does not fit 2 ranks for Megatron
    assert megatron.returncode == 2
    bad = check("--world-size", 2, "--engine", "deepspeed", "tiny_cpu", *base, "deepspeed.zero_stage=5")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: ZeRO stage 5: choose 0, 1, 2 or 3"
