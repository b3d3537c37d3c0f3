#!/usr/bin/env python
"""Does value residual beat vanilla at equal budget? Every variant, k seeds, through the real trainer.

    python bench/quality.py                         # tiny model, Shakespeare seen once, 3 seeds (2 CPU cores)
    python bench/quality.py --budget flops          # equal training FLOPs instead of equal tokens
    python bench/quality.py --size small --jobs 8 --data PREFIX --tokenizer MODEL   # a GPU node
    python bench/quality.py --data PREFIX --valid HELDOUT --tokenizer MODEL --init paper   # a held-out set of yours
    python bench/quality.py --size resformer_82m --variants vanilla identity svformer --seeds 1 --minutes 2.5 \
        --data data/english/train --valid data/english/valid --tokenizer data/english/tok.model   # one GPU

Each (variant, seed) is one single-process run of pretrain/pretrain_resformer.py with identical settings but for
the variant; the seed sets both the init and the data order; the validation set (held-out documents: data.split's
5%, or all of --valid's) is the same for every run and scored whole (train.eval_full). Bits/byte divides the bits
of exactly the scored tokens by the UTF-8 bytes those tokens decode to (rf_megatron/scored_bytes.py). No token is
seen twice: the tiny default trains 150 steps (0.18 of a pass over Shakespeare, what fits 30 min on 2 CPU cores),
larger sizes one pass (--epochs), or what fits --minutes of training per run at the size's tokens/s. The
resformer_82m size is the GPU preset (tests/gpu/device_check.sh runs it with RF_CHECK_QUALITY=1): the paper's 82M
shape (rf_megatron/presets/resformer_82m.yaml), bf16, on the English corpus tools/build_english_corpus.py builds
(tests/gpu/README.md). --plan prints every run's settings and stops before training. The table gives the mean
final validation loss (nats/token and bits/byte), the difference to vanilla with a 95% t interval paired by seed,
tokens/s and parameters; then the learnable lambdas
and the attention concentration (tools/analyze_attention.py's metrics) of each variant's seed-0 model. Writes
OUT/report.md, OUT/results.json, OUT/valid_curves.png, OUT/lambdas.png and OUT/attention/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rf_megatron.config import INITS  # noqa: E402

VARIANTS = {
    "vanilla": {"model.variant": "vanilla"},
    "identity": {"model.variant": "resformer", "model.lambda_mode": "identity"},
    "constant": {"model.variant": "resformer", "model.lambda_mode": "constant"},
    "learnable": {"model.variant": "resformer", "model.lambda_mode": "learnable"},
    "learnable_plus": {"model.variant": "resformer", "model.lambda_mode": "learnable_plus"},
    "sparse": {"model.variant": "resformer", "model.lambda_mode": "sparse"},
    "svformer": {"model.variant": "svformer"},
}


def preset_shape(name: str) -> dict:
    """A preset's model shape (rf_megatron/presets/NAME.yaml), so the GPU size trains what the preset names."""
    import yaml

    model = yaml.safe_load((REPO / "rf_megatron" / "presets" / f"{name}.yaml").read_text())["model"]
    return {f"model.{k}": model[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                                             "seq_length")}


# Model and batch (keys with a dot are run config); the learning rate is the same for every variant. tokens_per_s:
# a training speed, for --minutes; jobs: runs at a time by default.
SIZES = {
    "tiny": {"default_steps": 150,  # 0.18 of Shakespeare's training tokens: 21 runs fit 30 min on 2 CPU cores
             "model.num_layers": 6, "model.hidden_size": 128, "model.num_attention_heads": 4,
             "model.ffn_hidden_size": 352, "model.seq_length": 128, "train.global_batch_size": 16,
             "train.micro_batch_size": 16, "optim.lr": 3e-3, "optim.min_lr": 3e-4},
    "small": {"default_steps": None,  # one pass over the training tokens
              "model.num_layers": 12, "model.hidden_size": 512, "model.num_attention_heads": 8,
              "model.ffn_hidden_size": 1408, "model.seq_length": 512, "train.global_batch_size": 64,
              "train.micro_batch_size": 8, "optim.lr": 1e-3, "optim.min_lr": 1e-4},
    # one H200: the 82M shape in bf16, 32 x 2048 = 65,536 tokens a step; 160k tokens/s is below the 168k that
    # tests/gpu/README.md measured at this shape with a 50,304 vocabulary (the English corpus' is 16,384), so
    # --minutes errs short
    "resformer_82m": {"default_steps": None, "tokens_per_s": 160_000, "jobs": 1, **preset_shape("resformer_82m"),
                      "parallel.params_dtype": "bf16", "train.global_batch_size": 32, "train.micro_batch_size": 16,
                      "optim.lr": 1e-3, "optim.min_lr": 1e-4},
}
DEFAULT_DATA = REPO / "data" / "shakespeare_text_document"
DEFAULT_TOKENIZER = REPO / "data" / "shakespeare_tok.model"


def prepare_default_corpus() -> None:
    """Shakespeare as the default job makes it (scripts/default_job.sh), if not there yet."""
    py, tools = sys.executable, REPO / "tools"
    steps = [[py, tools / "fetch_shakespeare.py", "--output", REPO / "data"]]
    if not DEFAULT_TOKENIZER.exists():
        steps.append([py, tools / "train_tokenizer.py", "--input", REPO / "data" / "shakespeare.jsonl",
                      "--vocab-size", "4096", "--output-prefix", REPO / "data" / "shakespeare_tok"])
    if not Path(f"{DEFAULT_DATA}.idx").exists():
        steps.append([py, tools / "preprocess_data.py", "--input", REPO / "data" / "shakespeare.jsonl",
                      "--tokenizer-model", DEFAULT_TOKENIZER, "--output-prefix", DEFAULT_DATA, "--workers", "2"])
    for cmd in steps:
        subprocess.run([str(c) for c in cmd], check=True, cwd=REPO)


def corpus_tokens(prefix) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))  # keep it alive: its arrays view a memory map it closes when collected
    return int(dataset.sequence_lengths.sum())


def held_out_part(base: dict):
    """(prefix, split weights, part) of the documents the validation set holds: data.valid_paths whole (--valid),
    else data.split's validation share of data.paths."""
    import yaml

    from rf_megatron.data import blend_prefixes, split_weights

    own = base.get("data.valid_paths")
    paths = own if own is not None else base["data.paths"]
    paths = yaml.safe_load(paths) if isinstance(paths, str) else paths  # --valid's string or --set's list
    prefixes = blend_prefixes(paths if isinstance(paths, list) else [paths])
    if len(prefixes) != 1:
        raise SystemExit(f"error: bench/quality.py scores one held-out dataset, not the blend {paths}")
    if own is not None:
        return Path(prefixes[0]), (1,), 0
    return Path(prefixes[0]), split_weights(base["data.split"]), 1


def held_out_documents(prefix: Path, weights, part: int):
    """(first document, end document, their token ids) of one split of an indexed dataset."""
    from rf_megatron.indexed_data import split_token_counts, split_tokens

    counts = split_token_counts(str(prefix), weights)
    first = sum(docs for docs, _ in counts[:part])
    return first, first + counts[part][0], np.asarray(split_tokens(str(prefix), weights, part))


def held_out_text(jsonl: Path | None, prefix: Path, weights, part: int, tokenizer) -> str:
    """The held-out set's last document (the attention analysis reads it): from --text-jsonl, which must be the
    text the scored dataset was made of (its documents, tokenizing to the same ids), else decoded from the ids."""
    from rf_megatron.indexed_data import iter_documents

    first, end, ids = held_out_documents(prefix, weights, part)
    if jsonl is None:
        starts = np.flatnonzero(ids[:-1] == tokenizer.eod) + 1
        return tokenizer.detokenize(ids[starts[-1] if len(starts) else 0:-1])
    documents = held_out_documents(prefix, (1,), 0)[1]
    texts = [text for text, _ in iter_documents(str(jsonl)) if text.strip()]  # preprocess_data skips empty ones
    same = len(texts) == documents and np.array_equal(
        np.concatenate([tokenizer.tokenize(t) + [tokenizer.eod] for t in texts[first:end]]), ids)
    if not same:
        raise SystemExit(f"error: --text-jsonl {jsonl} is not the text of the scored dataset {prefix} "
                         f"({len(texts)} documents vs {documents}, or other tokens): pass that dataset's own "
                         "JSONL, or leave --text-jsonl out")
    return texts[end - 1]


def scored_bytes(plan: dict, tokenizer):
    """(tokens, UTF-8 bytes) the validation scored: its dataset rebuilt as the trainer builds it (fixed seed)."""
    from rf_megatron.data import _build_held_out, split_weights
    from rf_megatron.run_config import load_run_config
    from rf_megatron.scored_bytes import dataset_scored_bytes

    cfg = load_run_config("tiny_cpu", [f"{k}={v}" for k, v in plan.items()])
    return dataset_scored_bytes(_build_held_out(cfg, tokenizer, split_weights(cfg.data.split), 1), tokenizer)


def model_config(overrides):
    from rf_megatron.config import ModelConfig

    fields = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
    return ModelConfig(**fields)


def run_one(name, seed, overrides, out: Path, log) -> Path:
    """One training run (skipped when its metrics say it finished); returns its directory."""
    run = out / "runs" / f"{name}_seed{seed}"
    done = run / "DONE"
    if done.exists():
        return run
    args = [f"{k}={v}" for k, v in {**overrides, "train.seed": seed, "logging.dir": run,
                                     "checkpoint.dir": run / "ckpt"}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(REPO / "pretrain" / "pretrain_resformer.py"), "--config", "tiny_cpu", *args]
    begin = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{name} seed {seed} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    done.write_text(f"{time.monotonic() - begin:.1f}\n")
    log(f"  {name} seed {seed}: {time.monotonic() - begin:.0f} s")
    return run


def read_run(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    valid = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first window includes warm-up
    lambdas = {}
    for r in rows:
        for key, value in r.items():
            if key.startswith(("lambda1/", "lambda2/")):
                lambdas.setdefault(key, []).append((r["step"], value))
    return {"valid": valid, "final": valid[-1][1], "tokens_per_s": sum(speed) / max(len(speed), 1),
            "lambdas": lambdas, "valid_tokens": [r["valid_tokens"] for r in rows if "valid_tokens" in r][-1]}


def paired_ci(diffs, level=0.95):
    """Mean and t interval of per-seed differences."""
    from scipy import stats

    k = len(diffs)
    mean = sum(diffs) / k
    if k < 2:
        return mean, (float("nan"), float("nan"))
    half = stats.t.ppf(0.5 + level / 2, k - 1) * _sd(diffs) / math.sqrt(k)
    return mean, (mean - half, mean + half)


def plots(results, variants, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in variants:
        curves = [r["valid"] for r in results[name]]
        steps = [s for s, _ in curves[0]]
        values = np.array([[v for _, v in c][:len(steps)] for c in curves])
        line, = ax.plot(steps, values.mean(0), label=name)
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss: mean over seeds, band = min..max")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "valid_curves.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in variants:
        for key, points in sorted(results[name][0]["lambdas"].items()):
            ax.plot([s for s, _ in points], [v for _, v in points], label=f"{name} {key}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("lambda")
    ax.set_title("learnable lambdas per layer (seed 0)")
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "lambdas.png", dpi=120)


def attention(results_dirs, variants, text_file: Path, out: Path) -> dict:
    """tools/analyze_attention.py's metrics of each variant's seed-0 final checkpoint, averaged over layers."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "analyze_attention.py"), "--text", str(text_file),
                           "--out", str(out / "attention"), "--max-windows", "8",
                           *[f"--checkpoint={name}={results_dirs[name][0] / 'ckpt'}" for name in variants]],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        print(f"attention analysis failed (left out):\n{proc.stderr[-1500:]}")
        return {}
    import pandas as pd

    df = pd.read_csv(out / "attention" / "attention_stats.csv")
    return {name: {"attn_entropy_norm": float(g["attn_entropy_norm"].mean()),
                   "first_token_mass": float(g["first_token_mass"].mean())} for name, g in df.groupby("model")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", choices=("tokens", "flops"), default="tokens",
                   help="equal training tokens, or equal training FLOPs (steps scaled by vanilla's FLOPs/token)")
    p.add_argument("--epochs", type=float, help="passes over the training tokens (vanilla's budget; default: the "
                                                "size's steps, or one pass)")
    p.add_argument("--steps", type=int, help="vanilla's steps (overrides --minutes and --epochs)")
    p.add_argument("--minutes", type=float, help="vanilla's steps: what fits this many minutes of training per run "
                                                 "at --tokens-per-s (overrides --epochs)")
    p.add_argument("--tokens-per-s", type=float, help="training speed for --minutes (default: the size's figure; "
                                                      "resformer_82m: 160,000)")
    p.add_argument("--evals", type=int, default=3, help="validation points per run (the last at the end)")
    p.add_argument("--jobs", type=int, help="runs at a time (one process each; default 2, 1 for resformer_82m)")
    p.add_argument("--data", help="indexed dataset prefix (default: Shakespeare, prepared if missing)")
    p.add_argument("--valid", help="indexed dataset prefix of a held-out set of your own, scored whole (default: "
                                   "data.split's 5%% of --data); --data is then trained on whole")
    p.add_argument("--tokenizer", help="SentencePiece model of --data (and --valid)")
    p.add_argument("--init", choices=INITS, default="megatron",
                   help="model.init: megatron (output projections scaled by 1/sqrt(2L)) or paper (the released "
                        "code's N(0, 0.02) everywhere)")
    p.add_argument("--text-jsonl", help="the scored dataset's text as JSONL, refused unless it is (the attention "
                                        "analysis reads its last held-out document; default: decoded from the ids)")
    p.add_argument("--set", nargs="*", default=[], help="more run config overrides, key=value, for every run")
    p.add_argument("--out", default=str(REPO / "runs" / "quality"))
    p.add_argument("--no-attention", dest="attention", action="store_false")
    p.add_argument("--plan", action="store_true", help="print every run's settings, write OUT/plan.json, train nothing")
    a = p.parse_args(argv)
    for flag, path in (("--data", a.data), ("--valid", a.valid)):
        if path and not Path(f"{path}.idx").is_file():
            raise SystemExit(f"error: {flag} {path}: no {path}.idx (an indexed dataset prefix; the English corpus: "
                             "python tools/build_english_corpus.py)")
    for flag, path in (("--tokenizer", a.tokenizer), ("--text-jsonl", a.text_jsonl)):
        if path and not Path(path).is_file():
            raise SystemExit(f"error: {flag} {path}: no such file")
    speed = a.tokens_per_s or SIZES[a.size].get("tokens_per_s")
    if a.minutes is not None and not (a.minutes > 0 and speed):
        raise SystemExit(f"error: --minutes {a.minutes}: needs minutes > 0 and a training speed (--tokens-per-s; "
                         f"size {a.size} has none of its own)")
    at_a_time = a.jobs or SIZES[a.size].get("jobs", 2)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.data is None:
        prepare_default_corpus()
    data, tokenizer = Path(a.data or DEFAULT_DATA).resolve(), Path(a.tokenizer or DEFAULT_TOKENIZER).resolve()
    valid = Path(a.valid).resolve() if a.valid else None
    jsonl = Path(a.text_jsonl) if a.text_jsonl else None

    import yaml

    from rf_megatron.flops import parameter_counts, training_flops_per_token
    from rf_megatron.quiet import silence_known_warnings
    from rf_megatron.tokenizer import SentencePieceTokenizer
    from rf_megatron.vocab import padded_vocab_size

    silence_known_warnings()
    sp = SentencePieceTokenizer(tokenizer)

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in a.set)}
    size = {**{k: v for k, v in SIZES[a.size].items() if "." in k}, **overrides}  # run config keys only
    tokens = corpus_tokens(data)
    per_step = size["train.global_batch_size"] * size["model.seq_length"]
    share = 1.0 if valid else 0.95  # of the tokens, training's
    if a.steps:
        steps = a.steps
    elif a.minutes is not None:
        steps = round(a.minutes * 60 * speed / per_step)
    else:
        steps = (round(a.epochs * share * tokens / per_step) if a.epochs else SIZES[a.size]["default_steps"]
                 or round(share * tokens / per_step))
    steps = max(steps, 2)
    vocab = padded_vocab_size(sp.vocab_size, 128, 1)  # the tokenizer's, as a run with model.vocab_size=null takes
    base = {**size, "model.vocab_size": vocab, "data.paths": f"[{data}]", "data.tokenizer_model": tokenizer,
            "data.split": "100,0,0" if valid else "95,5,0", "data.cache_dir": out / "cache",
            **({"data.valid_paths": f"[{valid}]"} if valid else {}), "model.init": a.init,
            "parallel.tensor_parallel": 1,
            "train.eval_full": True, "train.lambda_log_interval": max(1, steps // 20), "train.log_interval": 10,
            "optim.lr_warmup_steps": max(1, steps // 20), "logging.wandb_project": "null",
            "checkpoint.save_interval": 0, "checkpoint.keep_last": 1, **overrides}
    heldout_part = held_out_part(base)
    heldout = held_out_text(jsonl, *heldout_part, sp)  # refuses a foreign --text-jsonl before any training
    flops = {name: training_flops_per_token(model_config({**base, **VARIANTS[name]})) for name in a.variants}
    plan = {}
    for name in a.variants:
        n = steps if a.budget == "tokens" else max(10, round(steps * flops.get("vanilla", flops[name]) / flops[name]))
        plan[name] = {**base, **VARIANTS[name], "train.train_steps": n, "train.eval_interval": max(1, n // a.evals)}
    print(f"{a.size}: {tokens:,} corpus tokens, {per_step} tokens/step, {steps} steps (vanilla; "
          f"{steps * per_step / (share * tokens):.2f} epochs), init {a.init}, {len(a.variants)} variants x "
          f"{a.seeds} seeds, equal {a.budget}, {at_a_time} at a time -> {out}", flush=True)
    if speed:
        print(f"at {speed:,.0f} tokens/s ({'--tokens-per-s' if a.tokens_per_s else f'the {a.size} figure'}): about "
              f"{steps * per_step / speed / 60:.1f} min of training per run, {a.seeds * len(a.variants)} runs "
              f"{at_a_time} at a time, plus start-up and evaluation", flush=True)
    if a.plan:
        plans = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in plan.items()}
        (out / "plan.json").write_text(json.dumps({"size": a.size, "steps": steps, "tokens_per_step": per_step,
                                                   "tokens_per_s": speed, "corpus_tokens": tokens, "plan": plans},
                                                  indent=1))
        for name in a.variants:
            print(f"  {name}: " + " ".join(f"{k}={v}" for k, v in plan[name].items()))
        print(f"wrote {out / 'plan.json'} (--plan: nothing trained)")
        return 0
    begin = time.monotonic()

    jobs = [(name, seed) for seed in range(a.seeds) for name in a.variants]
    with ThreadPoolExecutor(at_a_time) as pool:
        dirs = list(pool.map(lambda job: run_one(*job, plan[job[0]], out, lambda m: print(m, flush=True)), jobs))
    run_dirs = {name: [d for (n, _), d in zip(jobs, dirs) if n == name] for name in a.variants}
    results = {name: [read_run(d) for d in run_dirs[name]] for name in a.variants}
    scored_tokens, text_bytes = scored_bytes(plan[a.variants[0]], sp)
    logged = {r["valid_tokens"] for name in a.variants for r in results[name]}
    bpt = text_bytes / scored_tokens if logged == {scored_tokens} else None
    if bpt is None:  # the rebuilt set is not what the trainer scored: no bits/byte rather than a wrong one
        print(f"warning: the runs scored {sorted(logged)} validation tokens, the rebuilt set has {scored_tokens}: "
              "bits/byte left out")
    plots(results, a.variants, out)
    text_file = out / "heldout.txt"
    text_file.write_text(heldout[:200_000])  # the held-out set's last document
    concentration = attention(run_dirs, a.variants, text_file, out) if a.attention else {}

    lines = [f"# Value residual vs vanilla: {a.size}, equal {a.budget}, {a.seeds} seeds", "",
             "| variant | params | steps | valid loss (nats/token) | bits/byte | vs vanilla (95% CI, paired) | "
             "tokens/s | attn entropy (norm) | first-token mass |", "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in a.variants:
        finals = [r["final"] for r in results[name]]
        mean = sum(finals) / len(finals)
        diff, ci = (paired_ci([f - v["final"] for f, v in zip(finals, results["vanilla"])])
                    if "vanilla" in results and name != "vanilla" else (None, None))
        counts = parameter_counts(model_config(plan[name]))
        summary[name] = {"valid_loss": finals, "mean": mean, "diff_to_vanilla": diff, "diff_ci": ci,
                         "bits_per_byte": mean / math.log(2) / bpt if bpt else None, "params": counts.total,
                         "steps": plan[name]["train.train_steps"], "flops_per_token": flops[name],
                         "tokens_per_s": sum(r["tokens_per_s"] for r in results[name]) / len(finals),
                         **concentration.get(name, {})}
        s = summary[name]
        lines.append(f"| {name} | {s['params']:,} | {s['steps']} | {mean:.4f} +- {_sd(finals):.4f} | "
                     + (f"{s['bits_per_byte']:.4f}" if bpt else "-") + " | "
                     + ("-" if diff is None else f"{diff:+.4f} "
                        + (f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if a.seeds > 1 else "[one seed: no interval]")
                        + f" ({100 * diff / summary['vanilla']['mean']:+.2f}%)")
                     + f" | {s['tokens_per_s']:,.0f} | "
                     + (f"{s['attn_entropy_norm']:.3f} | {s['first_token_mass']:.3f} |" if name in concentration
                        else "- | - |"))
    if bpt:
        lines += ["", f"bits/byte: the {scored_tokens:,} scored validation tokens decode to {text_bytes:,} UTF-8 bytes "
                      f"({bpt:.3f} bytes/token) of the held-out documents of {heldout_part[0]}."]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    scored = {"tokens": scored_tokens, "bytes": text_bytes}  # what bits/byte divides
    plans = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in plan.items()}
    (out / "results.json").write_text(json.dumps({"summary": summary, "scored": scored, "plan": plans}, indent=1))
    print(report)
    print(f"wrote {out / 'report.md'}, results.json, valid_curves.png, lambdas.png"
          + (", attention/" if concentration else "") + f" ({(time.monotonic() - begin) / 60:.1f} min)")
    return 0


def _sd(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))


if __name__ == "__main__":
    sys.exit(main())
