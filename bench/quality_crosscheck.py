#!/usr/bin/env python
"""Is a null quality result the method, the setup, or our Megatron implementation? (bench/quality.py, item 4)

    python bench/quality_crosscheck.py                 # vanilla and ResFormer identity, 3 seeds, 50 steps, tiny shape

At the quality benchmark's tiny shape and data, for each seed, three trainings of each variant:
  hf-init/megatron   the Megatron trainer (TP1) from one set of weights initialised with model.init=paper
                     (normal(0, 0.02) everywhere, norms 1: the released code's HF init), imported weights-only
                     (tools/convert_hf_to_checkpoint), so that both engines start from the very same tensors
  hf-init/pytorch    the plain-PyTorch HF model (modeling_rfgpt.py / Llama) from the SAME weights, trained by
                     pretrain_hf_deepspeed.py (ZeRO-2, one process): same data order, LR schedule, weight decay
                     grouping (no decay on 1-D tensors: norms and lambdas), same lambda learning rate
  megatron-init      the Megatron trainer from Megatron's own init (model.init=megatron: output projections
                     scaled by 1/sqrt(2L)), bench/quality.py's default
It prints the largest per-step loss difference between the two engines on the same init (an implementation
check over the first steps), and ResFormer - vanilla (final training-window loss and validation loss) under
each init, paired by seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import quality  # noqa: E402  (the benchmark's shape, data and CI helpers)

VARIANTS = {"vanilla": quality.VARIANTS["vanilla"], "identity": quality.VARIANTS["identity"]}
ARMS = ("hf-init/megatron", "hf-init/pytorch", "megatron-init")
INIT = {"hf-init/megatron": "paper", "hf-init/pytorch": "paper", "megatron-init": "megatron"}  # model.init per arm


def run(cmd, log_path: Path) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"failed ({log_path}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def torchrun(script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            REPO / "pretrain" / script, *args]


def initial_folder(variant: str, seed: int, base: dict, out: Path, tokenizer: Path) -> Path:
    """The model.init=paper HF weights both hf-init arms start from."""
    from rf_megatron.hf.folder import write_model_files
    from rf_megatron.engines.deepspeed_model import build_fresh, hf_state

    init = out / "init" / f"{variant}_seed{seed}"
    if not (init / "config.json").exists():
        model = quality.model_config({**base, **VARIANTS[variant], "model.init": "paper"})
        init.mkdir(parents=True, exist_ok=True)
        write_model_files(init, hf_state(build_fresh(model, seed=1000 + seed), model), model, {}, "fp32", 1 << 30)
        shutil.copyfile(tokenizer, init / "tokenizer.model")
    return init


def one(arm: str, variant: str, seed: int, base: dict, out: Path, tokenizer: Path) -> Path:
    """One training; returns its log directory (skipped when done)."""
    run_dir = out / arm.replace("/", "_") / f"{variant}_seed{seed}"
    if (run_dir / "DONE").exists():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = {**base, **VARIANTS[variant], "model.init": INIT[arm], "train.seed": seed, "logging.dir": run_dir,
                 "checkpoint.dir": run_dir / "ckpt"}
    args = [f"{k}={v}" for k, v in overrides.items()]
    begin = time.monotonic()
    if arm == "megatron-init":
        run(torchrun("pretrain_resformer.py", "--config", "tiny_cpu", *args), run_dir / "train.log")
    else:
        init = initial_folder(variant, seed, base, out, tokenizer)
        if arm == "hf-init/megatron":
            run([sys.executable, REPO / "tools" / "convert_hf_to_checkpoint.py", "--hf", init, "--output",
                 run_dir / "ckpt", *args], run_dir / "import.log")
            run(torchrun("pretrain_resformer.py", "--config", run_dir / "ckpt" / "iter_0000000" / "run_config.yaml",
                         *args), run_dir / "train.log")
        else:
            run(torchrun("pretrain_hf_deepspeed.py", "--deepspeed", "zero2", "--from-hf", init, *args),
                run_dir / "train.log")
    (run_dir / "DONE").write_text(f"{time.monotonic() - begin:.1f}\n")
    print(f"  {arm} {variant} seed {seed}: {time.monotonic() - begin:.0f} s", flush=True)
    return run_dir


def curve(run_dir: Path, key: str):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {r["step"]: r[key] for r in rows if key in r}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "runs" / "quality_crosscheck"))
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    quality.prepare_default_corpus()
    size = {k: v for k, v in quality.SIZES["tiny"].items() if k != "default_steps"}
    base = {**size, "model.vocab_size": 4096, "data.paths": f"[{quality.DEFAULT_DATA}]",
            "data.tokenizer_model": quality.DEFAULT_TOKENIZER, "data.split": "95,5,0", "data.cache_dir": out / "cache",
            "parallel.tensor_parallel": 1, "train.train_steps": a.steps, "train.log_interval": 1,
            "train.eval_interval": a.steps, "train.eval_full": True, "train.lambda_log_interval": 0,
            "optim.lr_warmup_steps": max(1, a.steps // 20), "logging.wandb_project": "null",
            "checkpoint.save_interval": 0, "checkpoint.keep_last": 1}
    jobs = [(arm, v, s) for s in range(a.seeds) for v in VARIANTS for arm in ARMS]
    print(f"tiny shape, {a.steps} steps, {len(jobs)} runs, {a.jobs} at a time -> {out}", flush=True)
    for v in VARIANTS:  # the initial folders first: both hf-init arms read them, in parallel
        for s in range(a.seeds):
            initial_folder(v, s, base, out, quality.DEFAULT_TOKENIZER)
    with ThreadPoolExecutor(a.jobs) as pool:
        dirs = dict(zip(jobs, pool.map(lambda j: one(*j, base, out, quality.DEFAULT_TOKENIZER), jobs)))

    lines = [f"# Cross-check: {a.steps} steps, tiny shape, {a.seeds} seeds", "",
             "Same initial weights, Megatron trainer vs plain-PyTorch HF model (max |loss difference| over all steps):", ""]
    for v in VARIANTS:
        worst = max(abs(curve(dirs[("hf-init/megatron", v, s)], "last_loss")[k]
                        - curve(dirs[("hf-init/pytorch", v, s)], "last_loss")[k])
                    for s in range(a.seeds) for k in range(1, a.steps + 1))
        lines.append(f"- {v}: {worst:.2e}")
    lines += ["", "| init / engine | vanilla valid | identity valid | identity - vanilla (95% CI, paired) | "
              "train loss, last 10 steps: identity - vanilla |", "|---|---|---|---|---|"]
    summary = {}
    for arm in ARMS:
        valid = {v: [list(curve(dirs[(arm, v, s)], "valid_loss").values())[-1] for s in range(a.seeds)]
                 for v in VARIANTS}
        train = {v: [sum(curve(dirs[(arm, v, s)], "last_loss")[k] for k in range(a.steps - 9, a.steps + 1)) / 10
                     for s in range(a.seeds)] for v in VARIANTS}
        diff, ci = quality.paired_ci([i - v for i, v in zip(valid["identity"], valid["vanilla"])])
        tdiff = sum(i - v for i, v in zip(train["identity"], train["vanilla"])) / a.seeds
        summary[arm] = {"valid": valid, "train_last10": train, "diff": diff, "ci": ci}
        mean = {v: sum(x) / len(x) for v, x in valid.items()}
        lines.append(f"| {arm} | {mean['vanilla']:.4f} | {mean['identity']:.4f} | {diff:+.4f} "
                     f"[{ci[0]:+.4f}, {ci[1]:+.4f}] ({100 * diff / mean['vanilla']:+.2f}%) | {tdiff:+.4f} |")
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(report)
    return 0 if all(math.isfinite(s["diff"]) for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
