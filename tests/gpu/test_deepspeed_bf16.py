"""The DeepSpeed trainer on GPUs: bf16 ZeRO-2 and ZeRO-3 over NCCL. Skips cleanly without CUDA and
DeepSpeed; a skip here is not a result. Run on a GPU node: `pytest tests/gpu`."""
import json

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("deepspeed")

from conftest import REPO, build_tiny_corpus, torchrun  # noqa: E402

GPUS = min(torch.cuda.device_count(), 2)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_training_learns_and_writes_a_bf16_hf_folder(stage, tmp_path):
    # every run's checkpoints in its own tmp folder: with the preset's folder (runs/tiny_cpu/checkpoints in the
    # repository), [3] found the step-20 checkpoint [2] had left there and stopped as already finished, writing no
    # metrics.jsonl
    data = build_tiny_corpus(tmp_path)
    run = tmp_path / "run"
    torchrun(REPO / "pretrain" / "pretrain_hf_deepspeed.py", GPUS, "--deepspeed", f"zero{stage}",
             "model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4", "model.vocab_size=320",
             "model.seq_length=64", "train.train_steps=20", "train.global_batch_size=8", "train.micro_batch_size=2",
             "train.log_interval=1", "train.eval_interval=0", "optim.lr_warmup_steps=2", "parallel.tensor_parallel=1",
             "parallel.params_dtype=bf16", f"data.paths=[{data / 'corpus'}]", f"data.tokenizer_model={data / 'tok.model'}",
             "data.split=90,10,0", f"logging.dir={run}", f"checkpoint.dir={run / 'checkpoints'}",
             "logging.wandb_project=null",
             env={"RF_MEGATRON_CPU": "0"})
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r["last_loss"] for r in rows if "last_loss" in r]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5
    assert json.loads((run / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
