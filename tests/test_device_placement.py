"""Device placement, seen without a GPU (issue #12): the real entry point under RF_MEGATRON_CPU=simulate-gpu
(rf_megatron/simulated_gpu.py) takes the GPU code path (build on the device -> DDP -> forward/backward ->
optimizer step -> loss reduction -> evaluation -> checkpoint save) while every tensor carries the device it would
live on. A host tensor mixed into device math, or handed to a collective (NCCL), raises as CUDA would, so a
missing `.to(device)` turns these tests red. One launch per layout (2 processes each)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, build_tiny_corpus, free_port, torchrun

TRAIN = REPO / "pretrain" / "pretrain_resformer.py"
TRAIN_DS = REPO / "pretrain" / "pretrain_hf_deepspeed.py"
SIMULATED = {"RF_MEGATRON_CPU": "simulate-gpu"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_corpus(tmp_path_factory.mktemp("data"))


def overrides(data, run, **extra):
    base = {
        "data.paths": f"[{data / 'corpus'}]", "data.tokenizer_model": data / "tok.model",
        "data.cache_dir": data / "cache", "data.split": "90,10,0",
        "model.num_layers": 4, "model.hidden_size": 32, "model.num_attention_heads": 2,
        "model.ffn_hidden_size": 64, "model.vocab_size": 384, "model.seq_length": 32,
        "model.lambda_mode": "learnable",
        "train.train_steps": 2, "train.global_batch_size": 4, "train.micro_batch_size": 1,
        "train.log_interval": 1, "train.eval_interval": 1, "train.eval_steps": 1, "train.lambda_log_interval": 1,
        "optim.lr_warmup_steps": 1, "checkpoint.dir": run / "ckpt", "checkpoint.save_interval": 2,
        "logging.dir": run / "log", "logging.wandb_project": "null", "parallel.tensor_parallel": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def assert_ran_on_the_simulated_gpu(proc, run, steps=2):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "simulated GPU: CPU tensors tagged as cuda:0" in proc.stdout, out[-2000:]
    assert "running on the CPU" not in out
    rows = [json.loads(line) for line in open(run / "log" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert (run / "ckpt" / f"iter_{steps:07d}" / "manifest.json").is_file()
    assert "DeviceMismatch" not in out


@pytest.mark.parametrize("layout", [
    # 1F1B pipeline: V_1 travels to the second stage in the p2p tensor (also on Megatron-Core 0.19: its GPU code
    # path, device init and p2p buffers); sequence-parallel TP: SP norms' grads
    pytest.param({"parallel.pipeline_parallel": 2}, id="pp2", marks=pytest.mark.mcore_api),
    pytest.param({"parallel.tensor_parallel": 2, "parallel.sequence_parallel": "true", "model.variant": "svformer",
                  "model.lambda_mode": "identity"}, id="tp2_sp_svformer"),
    # data parallel with Megatron's distributed optimizer, learnable_plus's model-wide lambdas
    pytest.param({"parallel.distributed_optimizer": "true", "model.lambda_mode": "learnable_plus"}, id="dp2_distopt"),
])
def test_megatron_trainer_keeps_every_tensor_on_the_device(data, tmp_path, layout):
    run = tmp_path / "run"
    proc = torchrun(TRAIN, 2, "--config", "tiny_cpu", *overrides(data, run, **layout), env=SIMULATED, check=False)
    assert_ran_on_the_simulated_gpu(proc, run)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trainer_keeps_every_tensor_on_the_device(data, tmp_path, stage):
    """DeepSpeed's engine gets an accelerator naming the simulated device (it places the model there); our side
    moves the batches and keeps the all-reduced loss statistics on the device."""
    run = tmp_path / "run"
    proc = torchrun(TRAIN_DS, 2, "--config", "tiny_cpu", "--deepspeed", f"zero{stage}", *overrides(data, run),
                    env=SIMULATED, check=False)
    assert_ran_on_the_simulated_gpu(proc, run)
    assert f"DeepSpeed ZeRO-{stage} on 2 process(es) (cuda, fp32)" in proc.stdout


def _python(code: str, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_the_simulation_raises_where_cuda_would():
    """The checks themselves: mixed host/device math, a host tensor handed to a collective, and what stays legal
    (0-dim host scalars, copies into device tensors, moving both ways)."""
    code = f"""
import torch, torch.distributed as dist
from rf_megatron.device import select_device
from rf_megatron.simulated_gpu import DeviceMismatch
dev = select_device()
dist.init_process_group(init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
x = torch.ones(4, device=dev); host = torch.ones(4)
assert x.device == dev and x.is_cuda and not host.is_cuda
y = x * torch.tensor(2.0) + 1                   # a 0-dim host scalar is fine, as on CUDA
x[:2] = host[:2]; x.copy_(host)                 # copies across devices are fine
assert (host.to(dev) + x).is_cuda and not (x.cpu() + host).is_cuda
w = torch.nn.Linear(4, 4).to(dev)
assert w.weight.is_cuda and w(x).is_cuda
for bad in (lambda: x + host, lambda: w(host), lambda: dist.all_reduce(host)):
    try:
        bad()
    except DeviceMismatch as exc:
        print("raised:", exc)
    else:
        raise SystemExit("no error")
dist.all_reduce(x)
print("ok")
"""
    proc = _python(code, env=SIMULATED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raised = [line for line in proc.stdout.splitlines() if line.startswith("raised:")]
    assert len(raised) == 3 and proc.stdout.rstrip().endswith("ok"), proc.stdout
    assert "cuda tensor (4,) float32 and cpu tensor (4,) float32" in raised[0]
    assert "NCCL needs GPU tensors" in raised[2]


def test_a_gpu_job_without_gpus_stops_with_one_line(data, tmp_path):
    """SLURM gave the job GPUs but CUDA sees none (a broken node, a CPU-only torch): stop, never train on the CPU."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "SLURM_GPUS_ON_NODE": "8"}
    env.pop("RF_MEGATRON_CPU", None)
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", "tiny_cpu", *overrides(data, tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "asked for GPUs (SLURM_GPUS_ON_NODE=8) but CUDA sees none" in errors[0]
    assert not (tmp_path / "run" / "log" / "metrics.jsonl").exists()


def test_cpu_mode_is_said_once():
    proc = _python("from rf_megatron.device import select_device; select_device(); select_device()",
                   env={"RF_MEGATRON_CPU": "1", "RANK": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("running on the CPU with gloo (RF_MEGATRON_CPU=1)") == 1


def test_an_unknown_cpu_setting_is_one_error():
    proc = _python("from rf_megatron.device import select_device; select_device()", env={"RF_MEGATRON_CPU": "yes"})
    assert proc.returncode == 1 and "RF_MEGATRON_CPU='yes': use 1" in proc.stderr
