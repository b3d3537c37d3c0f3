"""tools/analyze_attention.py on real tiny checkpoints of every variant: per-layer attention
entropy, first-token mass and hidden-state similarity, loaded in one CPU process from checkpoints
saved under other layouts (TP2), with the recomputed attention checked against the kernel."""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

STEPS = 30
LAYERS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic corpus -> SentencePiece -> indexed dataset (as tests/test_pretrain.py), plus a text file."""
    root = tmp_path_factory.mktemp("analysis_data")
    rng = random.Random(0)
    words = ("the king queen lord lady sword castle night day love death heart blood crown fool wise speak "
             "thou thee art hath doth come go stay fair foul sweet gentle noble answer").split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 200))) + "." for _ in range(300)]
    with open(root / "corpus.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    (root / "sample.txt").write_text("\n".join(docs[:12]))
    for tool, *args in [("train_tokenizer.py", "--input", root / "corpus.jsonl", "--vocab-size", "300",
                         "--output-prefix", root / "tok"),
                        ("preprocess_data.py", "--input", root / "corpus.jsonl", "--tokenizer-model",
                         root / "tok.model", "--output-prefix", root / "corpus")]:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True,
                              text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
    return root


def _train(data, run_dir, variant, nproc=1, **extra):
    """One tiny training run with a checkpoint at the end; returns (ok, output)."""
    from rf_megatron.scaling.local_runner import command
    from rf_megatron.scaling.sweep import format_line

    over = {"data.paths": f"[{data / 'corpus'}]", "data.tokenizer_model": data / "tok.model",
            "data.cache_dir": data / "cache", "data.split": "90,10,0", "model.num_layers": LAYERS,
            "model.hidden_size": 64, "model.num_attention_heads": 4, "model.ffn_hidden_size": 128,
            "model.vocab_size": 320, "model.seq_length": 64, "model.variant": variant, "model.lambda_mode": "identity",
            "train.train_steps": STEPS, "train.global_batch_size": 8, "train.micro_batch_size": 4,
            "train.log_interval": 10, "train.eval_interval": 0, "train.eval_steps": 1, "optim.lr": 3e-3,
            "optim.lr_warmup_steps": 2, "checkpoint.dir": run_dir / "ckpt", "logging.dir": run_dir,
            "logging.wandb_project": None, "parallel.tensor_parallel": nproc, **extra}
    argv, env = command(format_line("tiny_cpu", {k: str(v) if v is not None else None for k, v in over.items()}), nproc)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RF_MEGATRON_CPU": "1",
                               **env})
    return proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    runs = {"vanilla": ("vanilla", 1, {}), "resformer": ("resformer", 1, {}),
            "resformer_tp2": ("resformer", 2, {}),  # same seed and data: the TP1 run's weights up to ~1e-6
            "svformer": ("svformer", 1, {"model.num_query_groups": 2})}  # GQA in the recompute too
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:  # two CPU processes at a time (the TP2 run is one launch)
        results = dict(zip(runs, pool.map(lambda item: _train(data, root / item[0], item[1][0], item[1][1], **item[1][2]),
                                          runs.items())))
    for label, (ok, log) in results.items():
        assert ok, f"{label}: {log[-4000:]}"
    return {label: root / label / "ckpt" for label in runs}


def _analyze(data, out_dir, *checkpoints, check=True):
    args = [a for label, path in checkpoints for a in ("--checkpoint", f"{label}={path}")]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "analyze_attention.py"), *args, "--text",
                           str(data / "sample.txt"), "--out", str(out_dir), "--max-windows", "8"],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def analysis(data, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    proc = _analyze(data, out, *checkpoints.items())
    import pandas as pd

    return pd.read_csv(out / "attention_stats.csv"), json.loads((out / "summary.json").read_text()), out, proc


def test_table_plot_and_summary_for_each_model(analysis, checkpoints):
    df, summary, out, proc = analysis
    print(proc.stdout)
    labels = list(checkpoints)
    assert list(df["model"].unique()) == labels
    s = 64
    for label in labels:
        rows = df[df["model"] == label].sort_values("layer")
        assert list(rows["layer"]) == list(range(LAYERS + 1))  # 0 = embeddings
        attn = rows[rows["layer"] >= 1]
        assert attn["attn_entropy"].between(0, math.log(s)).all()
        assert attn["attn_entropy_norm"].between(0, 1 + 1e-6).all()
        assert attn["first_token_mass"].between(0, 1).all()
        assert (attn["first_token_mass_max_head"] >= attn["first_token_mass"] - 1e-9).all()
        assert rows["hidden_cosine_sim"].between(-1, 1).all()
        info = summary[label]
        assert info["recompute_max_err"] < 1e-5  # softmax(QK^T) x V == the kernel's own output
        assert info["tokens"] == 8 * s
        assert info["loss"] < math.log(300) - 1, info  # trained: well below a uniform guess over the vocab
        assert info["variant"] == label.split("_")[0]
    assert (out / "attention_stats.png").stat().st_size > 10_000


def test_the_tool_prints_no_library_warnings(analysis):
    """Megatron's missing-Apex notes and library deprecations are not the user's business (rf_megatron/quiet.py)."""
    assert "Warning" not in analysis[3].stderr, analysis[3].stderr[-3000:]


def test_checkpoint_saved_under_tp2_loads_into_one_process(analysis):
    """Same seed, data and steps under TP1 and TP2 give the same weights (to float noise), so a TP2
    checkpoint loaded TP1 must give the TP1 checkpoint's numbers."""
    df, summary, _, _ = analysis
    a = df[df["model"] == "resformer"].set_index("layer")
    b = df[df["model"] == "resformer_tp2"].set_index("layer")
    for col in ("attn_entropy", "first_token_mass", "hidden_cosine_sim"):
        assert (a[col] - b[col]).abs().max() < 1e-4, col
    assert summary["resformer"]["loss"] == pytest.approx(summary["resformer_tp2"]["loss"], abs=1e-4)


def test_vanilla_and_resformer_differ(analysis):
    """Not a claim about which concentrates more at this size, only that the tool sees two models."""
    df, summary, _, _ = analysis
    assert summary["vanilla"]["loss"] != summary["resformer"]["loss"]
    v = df[df["model"] == "vanilla"]["hidden_cosine_sim"].to_numpy()
    r = df[df["model"] == "resformer"]["hidden_cosine_sim"].to_numpy()
    assert abs(v - r).max() > 1e-3


def test_svformer_per_layer_qkv_keys_load(analysis):
    """SVFormer's layer 1 has V rows in its fused QKV and later layers do not, so its checkpoint
    keys are per layer (rf_megatron/attention.py); they load here, GQA included."""
    df, summary, _, _ = analysis
    assert summary["svformer"]["recompute_max_err"] < 1e-5 and len(df[df["model"] == "svformer"]) == LAYERS + 1
    assert summary["svformer"]["loss"] < math.log(300) - 1


def test_model_key_missing_from_checkpoint_fails_with_its_name(data, checkpoints, tmp_path):
    """StrictHandling.RAISE_UNEXPECTED: a run config that asks for parameters the checkpoint lacks
    (learnable lambdas on an identity checkpoint) fails naming them, instead of keeping random init."""
    from rf_megatron.checkpointing import latest_checkpoint

    bad = tmp_path / "iter"
    shutil.copytree(latest_checkpoint(checkpoints["resformer"]), bad)
    cfg = bad / "run_config.yaml"
    cfg.write_text(cfg.read_text().replace("lambda_mode: identity", "lambda_mode: learnable"))
    proc = _analyze(data, tmp_path / "out", ("bad", bad), check=False)
    assert proc.returncode == 2
    assert "value_residual_lambdas" in proc.stderr and "error:" in proc.stderr
