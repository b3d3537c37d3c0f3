"""bench/quality.py end to end at toy scale: 2 variants x 2 seeds of a few steps through the real trainer, the
paired table, the curves, the lambdas and the attention metrics (the pipeline, not the result: README reports
the measured result at the bench's defaults)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, build_tiny_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_tiny_corpus(tmp_path_factory.mktemp("quality_data"))


def test_two_seeds_of_two_variants_give_a_paired_table_curves_lambdas_and_attention(corpus, tmp_path):
    out = tmp_path / "quality"
    args = [sys.executable, str(REPO / "bench" / "quality.py"), "--variants", "vanilla", "learnable", "--seeds", "2",
            "--steps", "3", "--evals", "2", "--data", corpus / "corpus", "--tokenizer", corpus / "tok.model",
            "--text-jsonl", corpus / "corpus.jsonl", "--out", out, "--set", "train.log_interval=1"]
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())["summary"]
    vanilla, learnable = summary["vanilla"], summary["learnable"]
    assert len(vanilla["valid_loss"]) == len(learnable["valid_loss"]) == 2 and vanilla["steps"] == 3
    diffs = [b - a for a, b in zip(vanilla["valid_loss"], learnable["valid_loss"])]
    assert learnable["diff_to_vanilla"] == pytest.approx(sum(diffs) / 2)
    lo, hi = learnable["diff_ci"]
    assert lo < learnable["diff_to_vanilla"] < hi and vanilla["diff_to_vanilla"] is None
    assert vanilla["valid_loss"][0] != vanilla["valid_loss"][1]  # the seed changes init and data order
    assert learnable["params"] == vanilla["params"] + 2 * 5  # a (lambda1, lambda2) pair per layer >= 2 (6 layers)
    assert learnable["tokens_per_s"] > 0 and 0 < learnable["first_token_mass"] < 1
    assert 0 < learnable["bits_per_byte"] < learnable["mean"] / 0.69  # > 1 byte per token
    report = (out / "report.md").read_text()
    assert "| learnable |" in report and "(95% CI, paired)" in report
    for png in ("valid_curves.png", "lambdas.png", "attention/attention_stats.png"):
        assert (out / png).stat().st_size > 5_000
    metrics = [json.loads(line) for line in (out / "runs" / "learnable_seed0" / "metrics.jsonl").open()]
    assert any("lambda1/layer2" in row for row in metrics)
