"""Validation that measures (issue #19): a held-out set of its own (data.valid_paths), scored in a fixed order that
no seed, interval or layout changes, optionally whole (train.eval_full), with the tokens scored logged beside the
loss; train.eval_only scores a checkpoint without training."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, build_tiny_corpus, torchrun

TRAIN = REPO / "pretrain" / "pretrain_resformer.py"
TRAIN_DS = REPO / "pretrain" / "pretrain_hf_deepspeed.py"
SEQ = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny corpus, plus held-out files of their own (documents the training corpus does not hold):
    heldout (25 documents) and heldout_doc (one document: its samples are consecutive windows of the file)."""
    root = build_tiny_corpus(tmp_path_factory.mktemp("data"))
    texts = [" ".join(reversed(json.loads(line)["text"].split())) for line in open(root / "corpus.jsonl")]
    for name, docs in (("heldout", texts[:25]), ("heldout_doc", [" ".join(texts[25:40])])):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in docs)
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                               str(root / f"{name}.jsonl"), "--tokenizer-model", str(root / "tok.model"),
                               "--output-prefix", str(root / name)], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
    return root


def overrides(data, run, **extra):
    base = {
        "data.paths": f"[{data / 'corpus'}]", "data.tokenizer_model": data / "tok.model",
        "data.cache_dir": data / "cache", "data.split": "90,10,0",
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 2,
        "model.ffn_hidden_size": 64, "model.vocab_size": 384, "model.seq_length": SEQ,
        "model.lambda_mode": "learnable",
        "train.train_steps": 4, "train.global_batch_size": 4, "train.micro_batch_size": 2,
        "train.log_interval": 1, "train.eval_interval": 2, "train.eval_steps": 2, "train.lambda_log_interval": 0,
        "optim.lr_warmup_steps": 1, "optim.lr": 3e-3,
        "checkpoint.dir": run / "ckpt", "checkpoint.save_interval": 0,
        "logging.dir": run / "log", "logging.wandb_project": "null", "parallel.tensor_parallel": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def rows_with(run, key="valid_loss"):
    return [row for row in map(json.loads, open(run / "log" / "metrics.jsonl")) if key in row]



@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """4 steps, TP1, held-out validation and test files, checkpoint at step 4."""
    run = tmp_path_factory.mktemp("trained")
    proc = torchrun(TRAIN, 1, "--config", "tiny_cpu", *overrides(data, run, **{
        "data.valid_paths": f"[{data / 'heldout'}]", "data.test_paths": f"[{data / 'heldout_doc'}]",
        "data.split": "100,0,0"}))
    (run / "stdout").write_text(proc.stdout)
    return run


def heldout_samples(data, name="heldout"):
    """Samples in one epoch of a held-out file: GPTDataset cuts (tokens - 1) // seq of them."""
    from rf_megatron.indexed_data import verify_indexed_dataset

    _, tokens = verify_indexed_dataset(str(data / name))
    return (tokens - 1) // SEQ


def test_every_evaluation_scores_the_same_tokens_and_logs_how_many(data, trained):
    """Interval evaluations score eval_steps global batches; the one after the last step the whole held-out set
    (train.final_eval_full, on in the presets), and the console says which."""
    rows = rows_with(trained)
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["valid_tokens"] == 2 * 4 * SEQ  # eval_steps x global batch x seq
    assert rows[1]["valid_tokens"] == heldout_samples(data) * SEQ > 2 * 4 * SEQ
    log = (trained / "stdout").read_text()
    assert f"| {2 * 4 * SEQ:,} tokens, a sample (train.eval_full=true scores the whole set)" in log
    assert f"| {heldout_samples(data) * SEQ:,} tokens, the whole set" in log


@pytest.mark.parametrize("layout", [
    pytest.param({"train.seed": 1, "train.eval_interval": 1, "train.train_steps": 40, "optim.lr": 1e-3},
                 id="tp1-other-seed-interval-and-schedule"),
    pytest.param({"parallel.tensor_parallel": 2, "train.seed": 7}, id="tp2-other-seed"),
    pytest.param({"parallel.pipeline_parallel": 2}, id="pp2"),
])
def test_a_checkpoints_validation_loss_is_the_same_in_any_layout_and_seed(data, trained, tmp_path, layout):
    """eval_only on the step-4 checkpoint: the same samples in the same order, so the same loss (to fp32 sums)."""
    run = tmp_path / "run"
    shutil.copytree(trained / "ckpt", run / "ckpt")
    nproc = 2 if any(layout.get(k, 1) == 2 for k in ("parallel.tensor_parallel", "parallel.pipeline_parallel")) else 1
    proc = torchrun(TRAIN, nproc, "--config", "tiny_cpu", *overrides(data, run, **{
        "data.valid_paths": f"[{data / 'heldout'}]", "data.split": "100,0,0", "train.eval_only": "true", **layout}))
    assert "resumed from" in proc.stdout
    # an evaluation has no schedule to follow and no step to reach: no note of schedule changes, no "/40"
    assert "LR schedule" not in proc.stdout and "evaluated: step 4, " in proc.stdout, proc.stdout[-2000:]
    (row,) = rows_with(run)
    want = rows_with(trained)[-1]
    assert row["step"] == 4 and row["valid_tokens"] == want["valid_tokens"]
    assert row["valid_loss"] == pytest.approx(want["valid_loss"], rel=0, abs=2e-6)


def test_the_test_set_is_scored_once_after_the_last_step(data, trained):
    (row,) = rows_with(trained, "test_loss")
    # whole, as the final validation (train.final_eval_full, on in the presets)
    assert row["step"] == 4 and row["test_tokens"] == heldout_samples(data, "heldout_doc") * SEQ
    assert row["test_ppl"] == pytest.approx(math.exp(row["test_loss"]))


def file_windows(prefix, seq):
    """Every (seq + 1)-token window GPTDataset cuts from a one-document file, read from the file itself."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == 1
    tokens = torch.from_numpy(dataset[0].astype("int64"))  # a copy: the file's memory map closes with `dataset`
    n = (len(tokens) - 1) // seq
    return torch.stack([tokens[i * seq:(i + 1) * seq + 1] for i in range(n)])


def test_eval_full_equals_a_hand_computed_mean_over_the_files_tokens(data, trained, tmp_path, megatron_single_rank):
    """Whole-set scoring (train.eval_full: eval_steps no longer matters) of a one-document file, on 2 data-parallel
    ranks with a padded last batch, against the checkpoint's model run here on every window of the file and
    averaged by hand."""
    from rf_megatron.hf import export as ex

    run = tmp_path / "run"
    shutil.copytree(trained / "ckpt", run / "ckpt")
    doc = data / "heldout_doc"
    torchrun(TRAIN, 2, "--config", "tiny_cpu", *overrides(data, run, **{
        "data.valid_paths": f"[{doc}]", "data.test_paths": f"[{doc}]", "data.split": "100,0,0",
        "train.eval_only": "true", "train.eval_full": "true", "train.eval_steps": 1}))  # eval_steps is ignored
    windows = file_windows(doc, SEQ)
    assert len(windows) % 4  # the last global batch is partial (padded, masked out)
    it = ex.resolve_checkpoint(run / "ckpt")
    with ex.megatron_single_process():
        model = ex.load_megatron_model(it, ex.read_run_config(it))
        logits = torch.cat([ex.megatron_logits(model, part[:, :-1]) for part in windows.split(8)])
    by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten()).item()
    (valid,), (test,) = rows_with(run, "valid_loss"), rows_with(run, "test_loss")
    assert valid["valid_tokens"] == test["test_tokens"] == windows[:, 1:].numel()
    assert valid["valid_loss"] == pytest.approx(by_hand, rel=0, abs=1e-5)
    assert test["test_loss"] == pytest.approx(by_hand, rel=0, abs=1e-5)


def test_deepspeed_scores_the_same_held_out_set(data, tmp_path):
    """The DeepSpeed engine reads the same validation samples, on 2 data-parallel ranks whose last batch leaves
    one rank only padding: its logged token counts are the file's windows, no more."""
    run = tmp_path / "run"
    torchrun(TRAIN_DS, 2, "--config", "tiny_cpu", "--deepspeed", "zero1", *overrides(data, run, **{
        "data.valid_paths": f"[{data / 'heldout_doc'}]", "data.split": "100,0,0", "train.eval_full": "true"}))
    assert heldout_samples(data, "heldout_doc") % 4 <= 2  # rank 1's share of the last global batch is padding
    assert {r["valid_tokens"] for r in rows_with(run)} == {heldout_samples(data, "heldout_doc") * SEQ}


def test_a_split_and_valid_paths_both_claiming_validation_is_one_line(data, tmp_path):
    proc = torchrun(TRAIN, 1, "--config", "tiny_cpu", *overrides(data, tmp_path, **{
        "data.valid_paths": f"[{data / 'heldout'}]", "data.split": "90,10,0"}), check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: data.split=90,10,0 gives part of data.paths to validation and data.valid_paths is set "
                      "too: use data.split=90,0,0 with data.valid_paths"], proc.stderr[-2000:]


def test_a_split_and_test_paths_both_claiming_the_test_set_is_one_line(data):
    from rf_megatron.config import ConfigError
    from rf_megatron.run_config import load_run_config

    cfg = load_run_config("tiny_cpu", overrides(data, data, **{"data.test_paths": f"[{data / 'heldout'}]",
                                                               "data.split": "90,5,5"}))
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value) == ("data.split=90,5,5 gives part of data.paths to test and data.test_paths is set too: "
                               "use data.split=90,5,0 with data.test_paths")
