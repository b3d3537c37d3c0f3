"""bench/quality.py end to end at toy scale: 2 variants x 2 seeds of a few steps through the real trainer on a
held-out set of its own (--valid), the paired table, bits/byte of exactly the scored text, the curves, the lambdas
and the attention metrics (the pipeline, not the result: README reports the measured result at the bench's
defaults)."""
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, build_tiny_corpus

BENCH = REPO / "bench" / "quality.py"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny corpus plus a held-out set of its own (heldout.jsonl -> heldout.bin/.idx, same tokenizer), whose
    accented words the tokenizer never saw (byte fallback: two bytes, two tokens each)."""
    root = build_tiny_corpus(tmp_path_factory.mktemp("quality_data"))
    rng = random.Random(1)
    words = "the king café lord naïve sword night love crown fool thou hath fair noble".split()
    with open(root / "heldout.jsonl", "w") as f:
        for _ in range(12):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(60, 120))) + "."}) + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                           str(root / "heldout.jsonl"), "--tokenizer-model", str(root / "tok.model"),
                           "--output-prefix", str(root / "heldout")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return root


def test_token_bytes_add_up_to_each_documents_text(corpus):
    """The per-token byte counts (byte fallback, the dummy prefix of a document's first piece) give every held-out
    document's UTF-8 length exactly."""
    from rf_megatron.indexed_data import split_tokens
    from rf_megatron.scored_bytes import scored_bytes
    from rf_megatron.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(corpus / "tok.model")
    ids = np.asarray(split_tokens(str(corpus / "heldout")))
    texts = [json.loads(line)["text"] for line in (corpus / "heldout.jsonl").open()]
    ends = np.flatnonzero(ids == tok.eod)
    assert len(ends) == len(texts) and any("é" in t for t in texts)
    for text, begin, end in zip(texts, [-1, *ends[:-1]], ends):
        doc = ids[begin + 1:end + 1]  # the document and its EOD, which decodes to nothing
        inputs = np.concatenate([[tok.eod], doc[:-1]])  # what precedes each token: EOD before the first
        assert scored_bytes(inputs, doc, np.ones(len(doc)), tok) == len(text.encode("utf-8"))


def test_a_text_jsonl_of_another_dataset_is_refused_before_training(corpus, tmp_path):
    """The report once divided the held-out set's bits by another file's bytes: a --text-jsonl that is not the
    scored dataset's text stops the bench in one line."""
    args = [sys.executable, str(BENCH), "--variants", "vanilla", "--data", corpus / "corpus", "--valid",
            corpus / "heldout", "--tokenizer", corpus / "tok.model", "--text-jsonl", corpus / "corpus.jsonl",
            "--out", tmp_path / "quality"]
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1 and not (tmp_path / "quality" / "runs").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: --text-jsonl {corpus / 'corpus.jsonl'} is not the text of the scored dataset {corpus / 'heldout'}")


def test_two_seeds_of_two_variants_give_a_paired_table_curves_lambdas_and_attention(corpus, tmp_path):
    out = tmp_path / "quality"
    args = [sys.executable, str(BENCH), "--variants", "vanilla", "learnable", "--seeds", "2",
            "--steps", "3", "--evals", "2", "--data", corpus / "corpus", "--valid", corpus / "heldout",
            "--tokenizer", corpus / "tok.model", "--text-jsonl", corpus / "heldout.jsonl", "--init", "paper",
            "--out", out, "--set", "train.log_interval=1"]
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    summary, scored = results["summary"], results["scored"]
    plan = results["plan"]["vanilla"]
    assert plan["model.init"] == "paper" and plan["data.valid_paths"] == f"[{corpus / 'heldout'}]"
    vanilla, learnable = summary["vanilla"], summary["learnable"]
    assert len(vanilla["valid_loss"]) == len(learnable["valid_loss"]) == 2 and vanilla["steps"] == 3
    diffs = [b - a for a, b in zip(vanilla["valid_loss"], learnable["valid_loss"])]
    assert learnable["diff_to_vanilla"] == pytest.approx(sum(diffs) / 2)
    lo, hi = learnable["diff_ci"]
    assert lo < learnable["diff_to_vanilla"] < hi and vanilla["diff_to_vanilla"] is None
    assert vanilla["valid_loss"][0] != vanilla["valid_loss"][1]  # the seed changes init and data order
    assert learnable["params"] == vanilla["params"] + 2 * 5  # a (lambda1, lambda2) pair per layer >= 2 (6 layers)
    assert learnable["tokens_per_s"] > 0 and 0 < learnable["first_token_mass"] < 1
    # bits/byte: the bits of the tokens the runs scored over the bytes those very tokens decode to
    metrics = [json.loads(line) for line in (out / "runs" / "vanilla_seed0" / "metrics.jsonl").open()]
    assert scored["tokens"] == [r["valid_tokens"] for r in metrics if "valid_tokens" in r][-1]
    text_bytes = sum(len(json.loads(line)["text"].encode()) for line in (corpus / "heldout.jsonl").open())
    assert 0.8 * text_bytes < scored["bytes"] <= text_bytes  # the held-out text, less what no sample scores
    bits = learnable["mean"] * scored["tokens"] / math.log(2)
    assert learnable["bits_per_byte"] == pytest.approx(bits / scored["bytes"])
    report = (out / "report.md").read_text()
    assert "| learnable |" in report and "(95% CI, paired)" in report
    for png in ("valid_curves.png", "lambdas.png", "attention/attention_stats.png"):
        assert (out / png).stat().st_size > 5_000
    metrics = [json.loads(line) for line in (out / "runs" / "learnable_seed0" / "metrics.jsonl").open()]
    assert any("lambda1/layer2" in row for row in metrics)
    last = json.loads((corpus / "heldout.jsonl").read_text().splitlines()[-1])["text"]
    assert (out / "heldout.txt").read_text() == last  # the attention text: the held-out set's last document


def test_the_gpu_preset_plans_the_82m_shape_in_bf16_for_its_minutes(corpus, tmp_path):
    """--size resformer_82m (tests/gpu/device_check.sh, RF_CHECK_QUALITY): the preset's shape in bf16, the tokenizer's
    vocabulary (not the preset's 50,304: a smaller one would index past it), one run at a time, and --minutes
    turned into steps at the size's tokens/s; --plan trains nothing."""
    import yaml

    out = tmp_path / "quality"
    args = [sys.executable, str(BENCH), "--size", "resformer_82m", "--variants", "vanilla", "identity", "svformer",
            "--seeds", "1", "--minutes", "2", "--data", corpus / "corpus", "--valid", corpus / "heldout",
            "--tokenizer", corpus / "tok.model", "--text-jsonl", corpus / "heldout.jsonl", "--plan", "--out", out]
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    shape = yaml.safe_load((REPO / "rf_megatron" / "presets" / "resformer_82m.yaml").read_text())["model"]
    per_step = 32 * shape["seq_length"]
    assert plan["tokens_per_step"] == per_step and plan["steps"] == round(2 * 60 * plan["tokens_per_s"] / per_step)
    for name in ("vanilla", "identity", "svformer"):
        run = plan["plan"][name]
        assert {k: run[f"model.{k}"] for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                                               "seq_length")} == {k: str(shape[k]) for k in (
            "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length")}
        assert run["parallel.params_dtype"] == "bf16" and run["model.vocab_size"] == "384"  # 300 pieces, padded
        assert run["train.train_steps"] == str(plan["steps"]) and run["data.valid_paths"] == f"[{corpus / 'heldout'}]"
    assert plan["plan"]["svformer"]["model.variant"] == "svformer"
    assert "1 at a time" in proc.stdout and not (out / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--size", "tiny", "--minutes", "1"], "error: --minutes 1.0: needs minutes > 0 and a training speed "
                                           "(--tokens-per-s; size tiny has none of its own)"),
    (["--data", "/nonexistent/english/train"], "error: --data /nonexistent/english/train: no "
                                               "/nonexistent/english/train.idx (an indexed dataset prefix; the "
                                               "English corpus: python tools/build_english_corpus.py)"),
])
def test_a_preset_it_cannot_run_is_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), *args, "--out", str(tmp_path / "q")], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == message and "Traceback" not in proc.stderr
