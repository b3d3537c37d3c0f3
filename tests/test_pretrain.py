"""The pretraining path end to end on CPU: tokenizer -> indexed data -> multi-process training ->
checkpoints -> resume (exactly, also after SIGTERM, kill -9 mid-save and a layout change)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, assert_diverged_at_step_3, build_tiny_corpus, free_port, torchrun

TRAIN = REPO / "pretrain" / "pretrain_resformer.py"
STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic English-ish corpus -> SentencePiece tokenizer -> Megatron indexed dataset."""
    return build_tiny_corpus(tmp_path_factory.mktemp("data"))


def run_tool(name, *args):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc


def overrides(data, run_dir, **extra):
    base = {
        "data.paths": f"[{data / 'corpus'}]", "data.tokenizer_model": data / "tok.model",
        "data.cache_dir": data / "cache", "data.split": "90,10,0",
        "model.num_layers": 4, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.ffn_hidden_size": 128, "model.vocab_size": 512, "model.seq_length": 64,
        "model.lambda_mode": "learnable",
        "train.train_steps": STEPS, "train.global_batch_size": 8, "train.micro_batch_size": 2,
        "train.log_interval": 1, "train.eval_interval": 0, "train.eval_steps": 1, "train.lambda_log_interval": 4,
        "optim.lr_warmup_steps": 2, "optim.lr": 3e-3,
        "checkpoint.dir": run_dir / "ckpt", "checkpoint.save_interval": 0, "logging.dir": run_dir / "log",
        "logging.wandb_project": "null", "parallel.tensor_parallel": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train(data, run_dir, nproc=2, **extra):
    return torchrun(TRAIN, nproc, "--config", "tiny_cpu", *overrides(data, run_dir, **extra), timeout=900)


def losses(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "log" / "metrics.jsonl")]
    return {r["step"]: r["last_loss"] for r in rows if "last_loss" in r}


def resume_from_step_5_of(full, run) -> None:
    """`run` starts with a copy of `full`'s step-5 checkpoint (a run stopped there has the same one: the stop
    paths themselves are test_resume_into_another_layout's, tests/test_slurm.py's and the signal tests')."""
    (run / "ckpt").mkdir(parents=True)
    shutil.copytree(full / "ckpt" / "iter_0000005", run / "ckpt" / "iter_0000005")
    (run / "ckpt" / "latest").write_text("iter_0000005")


KEEP_STEP_5 = {"checkpoint.save_interval": 5, "checkpoint.keep_last": 0}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """12 steps, TP2, with wandb (offline); checkpoints at steps 5, 10 and 12 (the resume tests start from 5)."""
    run = tmp_path_factory.mktemp("uninterrupted")
    begin = time.time()
    proc = train(data, run, **{"logging.wandb_project": "rf-test", "logging.peak_tflops": PEAK_TFLOPS, **KEEP_STEP_5})
    (run / "wall_seconds").write_text(str(time.time() - begin))
    (run / "output.txt").write_text(proc.stdout + proc.stderr)
    return run


PEAK_TFLOPS = 0.05  # logging.peak_tflops of the run above: what a CPU has no table entry for


@pytest.mark.mcore_api
def test_jsonl_holds_every_log_step(uninterrupted):
    rows = [json.loads(line) for line in open(uninterrupted / "log" / "metrics.jsonl")]
    assert sorted(losses(uninterrupted)) == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu"):
        assert all(key in r for r in rows if "last_loss" in r)
    assert any("valid_loss" in r for r in rows)
    lambdas = [r for r in rows if "lambda1/layer2" in r]
    assert [r["step"] for r in lambdas] == [4, 8, 12] and "lambda2/layer4" in lambdas[0]


def test_our_own_code_raises_no_warning_in_a_run(uninterrupted):
    """A warning a user cannot act on is noise; one from our code is ours to fix (the lambdas' log read a
    parameter as a float: torch warns about converting a tensor that requires grad)."""
    output = (uninterrupted / "output.txt").read_text()
    ours = [line for line in output.splitlines() if "Warning" in line and "/rf_megatron/" in line]
    assert not ours, ours


@pytest.mark.mcore_api
def test_throughput_tflops_and_mfu_follow_the_flop_formula_and_the_step_times(uninterrupted):
    from rf_megatron.flops import training_flops_per_token
    from rf_megatron.run_config import load_run_config

    cfg = load_run_config(str(uninterrupted / "ckpt" / "iter_0000012" / "run_config.yaml"))
    m, world = cfg.model, 2
    assert m.swiglu and m.kv_heads == m.num_attention_heads and m.variant == "resformer"
    h, ffn, L, s = m.hidden_size, m.ffn_hidden_size, m.num_layers, m.seq_length
    # 6 N for the matmul weights N (QKV, output projection, SwiGLU MLP, logits) plus attention's QK^T and AV
    # (2 x 2 s h per token and layer forward, x3 with backward)
    n_matmul = L * (4 * h * h + 3 * h * ffn) + m.vocab_size * h
    per_token = training_flops_per_token(m)
    assert per_token == pytest.approx(6 * n_matmul + 3 * 4 * L * s * h, rel=1e-9)
    rows = [json.loads(line) for line in open(uninterrupted / "log" / "metrics.jsonl")]
    rows = [r for r in rows if "last_loss" in r]
    tokens_per_step = cfg.train.global_batch_size * m.seq_length
    for r in rows:
        assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s"] * per_token / world / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / PEAK_TFLOPS, rel=1e-9)
    # tokens/s counts the steps' own time (log_interval 1: one step per row): their sum fits in the run's wall time
    step_seconds = sum(tokens_per_step / r["tokens_per_s"] for r in rows)
    assert len(rows) == STEPS and 0 < step_seconds < float((uninterrupted / "wall_seconds").read_text())


@pytest.mark.mcore_api
def test_training_reduces_the_loss(uninterrupted):
    curve = losses(uninterrupted)
    assert curve[STEPS] < curve[1] - 0.5


def test_plot_metrics_draws_a_runs_train_and_validation_loss(uninterrupted, tmp_path, capsys):
    """tools/plot_metrics.py on the run's real metrics.jsonl (in-process): what it plots is what the run logged; two
    runs overlaid (the folder and the file), a PNG with curves in it; a missing or empty file is one error line."""
    sys.path.insert(0, str(REPO / "tools"))
    import plot_metrics
    from PIL import Image

    rows = [json.loads(line) for line in open(uninterrupted / "log" / "metrics.jsonl")]
    curves = plot_metrics.read_curves(uninterrupted / "log" / "metrics.jsonl")
    assert curves["loss"] == [(r["step"], r["loss"]) for r in rows if "loss" in r] and len(curves["loss"]) == STEPS
    assert curves["valid_loss"] == [(STEPS, next(r["valid_loss"] for r in rows if "valid_loss" in r))]
    out = tmp_path / "plots" / "curves.png"
    assert plot_metrics.main([str(uninterrupted / "log"), str(uninterrupted / "log" / "metrics.jsonl"), "--labels",
                              "tp2", "again", "--x", "tokens", "--smooth", "0.5", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: tp2 ({STEPS} train, 1 validation points), again (")
    image = Image.open(out).convert("RGB")
    assert image.size == (1080, 660) and len(set(image.getdata())) > 50  # axes, two coloured runs, legend text
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "none").mkdir()  # a folder without metrics.jsonl
    for bad, said in ((tmp_path / "none", "metrics.jsonl: no such file"), (tmp_path / "empty.jsonl", "no training")):
        assert plot_metrics.main([str(bad), "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    assert not (tmp_path / "x.png").exists()


def wandb_history(run_file):
    """History rows of an offline .wandb file (LevelDB-log framing of protobuf Records; wandb
    0.31 ships no Python reader for it)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, records, pending, i, block = run_file.read_bytes(), [], b"", 7, 32768
    while i + 7 <= len(data):
        if block - i % block < 7:
            i += block - i % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[i:i + 7])
        chunk, i = data[i + 7:i + 7 + length], i + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.mark.mcore_api
def test_wandb_offline_run_holds_the_metrics(uninterrupted):
    runs = list((uninterrupted / "log" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    rows = wandb_history(next(runs[0].glob("run-*.wandb")))
    assert [r["_step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[0]["loss"] == pytest.approx(losses(uninterrupted)[1])
    assert "valid_loss" in rows[-1] and "lambda1/layer3" in rows[3]


@pytest.mark.mcore_api
def test_resolved_config_saved_with_run_and_checkpoint(uninterrupted):
    import yaml

    run_cfg = yaml.safe_load((uninterrupted / "log" / "config.yaml").read_text())
    ckpt_cfg = yaml.safe_load((uninterrupted / "ckpt" / f"iter_{STEPS:07d}" / "run_config.yaml").read_text())
    assert run_cfg == ckpt_cfg and run_cfg["model"]["hidden_size"] == 64


@pytest.mark.mcore_api
def test_resume_same_layout_is_bitwise(data, uninterrupted, tmp_path):
    resume_from_step_5_of(uninterrupted, tmp_path)
    train(data, tmp_path)
    want, got = losses(uninterrupted), losses(tmp_path)
    assert sorted(got) == list(range(6, STEPS + 1))
    assert [got[s] for s in range(6, STEPS + 1)] == [want[s] for s in range(6, STEPS + 1)]


@pytest.mark.parametrize("before,after", [
    # slow tier: TP -> PP resharding is also test_svformer_checkpoint_reshards_across_layouts and the converters'
    pytest.param({}, {"parallel.tensor_parallel": 1, "parallel.pipeline_parallel": 2}, marks=pytest.mark.slow),
    ({"parallel.distributed_optimizer": "true"}, {"parallel.tensor_parallel": 1, "parallel.distributed_optimizer": "true"}),
], ids=["tp2_to_pp2", "tp2_to_dp2_distopt"])
def test_resume_into_another_layout(data, uninterrupted, tmp_path, before, after):
    train(data, tmp_path, **before, **{"train.exit_interval": 5})
    train(data, tmp_path, **after)
    want, got = losses(uninterrupted), losses(tmp_path)
    for step in range(6, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


@pytest.mark.mcore_api
def test_distributed_optimizer_resume_is_bitwise(data, tmp_path):
    dp = {"parallel.tensor_parallel": 1, "parallel.distributed_optimizer": "true"}
    train(data, tmp_path / "full", **dp, **KEEP_STEP_5)
    resume_from_step_5_of(tmp_path / "full", tmp_path / "cut")
    train(data, tmp_path / "cut", **dp)
    want, got = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(6, STEPS + 1))
    assert [got[s] for s in range(6, STEPS + 1)] == [want[s] for s in range(6, STEPS + 1)]


@pytest.mark.mcore_api
def test_fused_adam_resume_is_bitwise_and_follows_the_foreach_run(data, uninterrupted, tmp_path):
    """optim.fused=true (torch's fused AdamW inside Megatron's distributed optimizer, the GPU default): resumed from
    step 5 it repeats its uninterrupted run exactly, and both follow the foreach run (`uninterrupted`, TP2) to
    fp32 rounding."""
    fused = {"parallel.tensor_parallel": 1, "parallel.distributed_optimizer": "true", "optim.fused": "true"}
    train(data, tmp_path / "full", **fused, **KEEP_STEP_5)
    resume_from_step_5_of(tmp_path / "full", tmp_path / "cut")
    train(data, tmp_path / "cut", **fused)
    foreach, want, got = losses(uninterrupted), losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(6, STEPS + 1))
    assert [got[s] for s in range(6, STEPS + 1)] == [want[s] for s in range(6, STEPS + 1)]
    for step in range(1, STEPS + 1):
        assert want[step] == pytest.approx(foreach[step], rel=1e-4, abs=1e-5), step


@pytest.mark.mcore_api
def test_extending_a_finished_run_follows_the_new_schedule(data, uninterrupted, tmp_path):
    """Resume the finished 12-step run with train.train_steps=16: the cosine decay now ends at 16
    (the checkpoint's 12-step schedule would pin the LR at min_lr), and the change is announced."""
    import math

    shutil.copytree(uninterrupted / "ckpt", tmp_path / "ckpt")
    proc = train(data, tmp_path, nproc=1, **{"train.train_steps": 16, "optim.min_lr": 1e-4,
                                             "train.global_batch_size": 16, "parallel.tensor_parallel": 1})
    assert "note: the LR schedule follows this run's config, changed since the checkpoint: " \
           "optim.min_lr 0.0003 -> 0.0001, train.train_steps 12 -> 16" in proc.stdout, proc.stdout[-2000:]
    # the other changes that shape the rest of the run are said too
    assert "note: train.global_batch_size 8 -> 16: each step from here reads 16 samples" in proc.stdout
    assert "note: the checkpoint was saved as TP2 x PP1 and loads into TP1 x PP1 (resharded)" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(lrs) == [13, 14, 15, 16]
    for step, lr in lrs.items():  # the LR after `step` updates: warmup 2, cosine 3e-3 -> 1e-4 over 16 steps
        want = 1e-4 + 0.5 * (math.cos(math.pi * (step - 2) / 14) + 1) * (3e-3 - 1e-4)
        assert lr == pytest.approx(want, rel=1e-9), (step, lr, want)


# slow tier: nan_policy=stop is also tests/test_faults.py's divergence test (one rank); skip is the stricter case here
@pytest.mark.parametrize("nan_policy", [pytest.param("stop", marks=pytest.mark.slow), "skip"])
def test_a_diverging_run_stops_with_one_error_line(data, tmp_path, nan_policy):
    """lr=1e30 blows the weights up at step 2; step 3's gradients are not finite and the fp32 update
    is applied: every rank stops, even under nan_policy=skip (rank 0 prints one line), and no
    checkpoint holds the broken weights."""
    proc = torchrun(TRAIN, 2, "--config", "tiny_cpu", *overrides(data, tmp_path, **{
        "optim.lr": 1e30, "checkpoint.save_interval": 1, "train.nan_policy": nan_policy}), check=False)
    assert_diverged_at_step_3(proc)
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000002"


def test_rerunning_a_finished_run_does_nothing_and_says_so(data, uninterrupted, tmp_path):
    """A re-run sweep or a resubmitted job whose checkpoint reached train.train_steps: exit 0 at once, no model
    built, no duplicate final-evaluation row (issue #18)."""
    shutil.copytree(uninterrupted / "ckpt", tmp_path / "ckpt")
    shutil.copytree(uninterrupted / "log", tmp_path / "log")
    before = (tmp_path / "log" / "metrics.jsonl").read_text()
    proc = train(data, tmp_path, nproc=1)
    assert f"already finished ({tmp_path / 'ckpt' / f'iter_{STEPS:07d}'} is step {STEPS}" in proc.stdout, proc.stdout
    assert "resumed from" not in proc.stdout and (tmp_path / "log" / "metrics.jsonl").read_text() == before


def test_switching_optimizer_kind_on_resume_is_a_clear_error(data, uninterrupted, tmp_path):
    shutil.copytree(uninterrupted / "ckpt", tmp_path / "ckpt")  # a checkpoint saved without the distributed optimizer
    proc = torchrun(TRAIN, 2, "--config", "tiny_cpu",
                    *overrides(data, tmp_path, **{"parallel.distributed_optimizer": "true",
                                                  "train.train_steps": STEPS + 2}), check=False)
    assert proc.returncode != 0 and "error: " in proc.stderr and "distributed_optimizer=false" in proc.stderr


def _launch(data, run_dir, **extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", str(TRAIN), "--config", "tiny_cpu", *overrides(data, run_dir, **extra)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.slow  # the SLURM tests run the same signal -> save -> resume-exactly path on a real cluster
def test_sigterm_saves_exits_zero_and_resumes_exactly(data, tmp_path):
    long = {"train.train_steps": 200}  # far more steps than we let it run
    proc = _launch(data, tmp_path / "cut", **long)
    metrics = tmp_path / "cut" / "log" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    for worker in psutil.Process(proc.pid).children():  # like SLURM signalling each srun task
        worker.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = int((tmp_path / "cut" / "ckpt" / "latest").read_text().split("_")[1])
    assert 3 <= stopped < 200 and "signal SIGTERM" in out
    until = {**long, "train.exit_interval": stopped + 3}
    train(data, tmp_path / "cut", **until)  # resumes at `stopped`
    train(data, tmp_path / "full", **until)  # the same schedule, never interrupted
    want, got = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [got[s] for s in range(stopped + 1, stopped + 4)] == [want[s] for s in range(stopped + 1, stopped + 4)]


def test_kill_during_save_keeps_previous_checkpoint(data, uninterrupted, tmp_path):
    proc = _launch(data, tmp_path, **{"checkpoint.save_interval": 4})
    ckpt = tmp_path / "ckpt"
    _wait_for(lambda: (ckpt / "iter_0000008.tmp").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "latest").read_text() == "iter_0000004"
    assert (ckpt / "iter_0000008.tmp").exists() and not (ckpt / "iter_0000008").exists()
    train(data, tmp_path)
    want, got = losses(uninterrupted), losses(tmp_path)
    assert [got[s] for s in range(5, STEPS + 1)] == [want[s] for s in range(5, STEPS + 1)]


def test_svformer_checkpoint_reshards_across_layouts(data, tmp_path):
    """SVFormer's layer 1 has V rows and the others do not: its QKV is checkpointed per layer."""
    svformer = {"model.variant": "svformer", "model.num_query_groups": 2, "model.lambda_mode": "identity"}
    train(data, tmp_path / "full", **svformer, **KEEP_STEP_5)
    resume_from_step_5_of(tmp_path / "full", tmp_path / "cut")
    train(data, tmp_path / "cut", **svformer, **{"parallel.tensor_parallel": 1, "parallel.pipeline_parallel": 2})
    want, got = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(6, STEPS + 1))
    for step in range(6, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
