"""The IsoFLOP plan: for every compute budget C and model size N, the tokens D with C = F(N) * D.

F is the training FLOPs per token by the chosen rule (`exact`, or the 6N shortcuts, see
`accounting`). Each run trains for `steps = round(D / tokens_per_step)` steps, so its real
compute is F * steps * tokens_per_step (off from C by at most half a step; `collect` records the
real value). The LR schedule (warmup + cosine to min_lr) is set to each run's own length, as
Chinchilla found it must be. Batch-size and LR rules are stated in the sweep header:

- batch `fixed`: the preset's global batch for every run (what the paper did: 2M tokens/step);
  `deepseek`: B_tokens = 0.292 * C^0.3271 (DeepSeek LLM, arXiv 2401.02954), rounded to whole
  micro batches;
- lr `fixed`: the preset's lr / min_lr; `inverse_width`: lr = lr_preset * hidden_preset / hidden
  (Adam's muP-style width scaling, min_lr keeps its ratio); `deepseek`: lr = 0.3118 * C^-0.125.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..config import ConfigError, replace
from .accounting import account, flops_per_token
from .family import ShapeRule, family_label, parse_family
from .sweep import format_line

BATCH_RULES = ("fixed", "deepseek")
LR_RULES = ("fixed", "inverse_width", "deepseek")
# keys the plan sets on every run; the user's --set may not touch them
PLANNED_KEYS = ("name", "model.variant", "model.lambda_mode", "model.num_layers", "model.hidden_size",
                "model.num_attention_heads", "model.num_query_groups", "model.ffn_hidden_size",
                "train.train_steps", "train.log_interval", "optim.lr",
                "optim.min_lr", "optim.lr_warmup_steps", "logging.dir", "checkpoint.dir")


@dataclass
class PlanSpec:
    preset: str
    families: List[str]
    depths: List[int]
    budgets: List[float]
    runs_dir: str
    shape: ShapeRule = field(default_factory=ShapeRule)
    overrides: List[str] = field(default_factory=list)  # user's key=value (data paths, layout, ...)
    flops_rule: str = "exact"
    batch_rule: str = "fixed"
    lr_rule: str = "fixed"
    warmup_frac: float = 0.02
    min_steps: int = 10
    per_budget: Optional[int] = None  # keep only this many sizes per budget, centred on ...
    tokens_per_param: float = 20.0  # ... the size whose D / N_total is closest to this
    checkpoints: bool = True  # False: checkpoint.dir=null (no resume; saves ~3 s per tiny CPU run)


@dataclass
class PlannedRun:
    name: str
    family: str
    budget: float
    depth: int
    shape: Dict[str, Optional[int]]
    N_nonembed: int
    N_total: int
    flops_per_token: float  # by the plan's rule
    flops_per_token_exact: float
    tokens_planned: float  # C / flops_per_token
    steps: int
    global_batch_size: int
    tokens: int  # steps * tokens_per_step, what the run trains on
    compute: float  # flops_per_token * tokens
    lr: float
    min_lr: float
    warmup: int
    line: str = ""


def _rounded_batch(tokens: float, seq: int, micro: int) -> int:
    return max(micro, micro * round(tokens / seq / micro))


def _lr(spec: PlanSpec, base, hidden: int, budget: float):
    lr, min_lr = base.optim.lr, base.optim.min_lr
    if spec.lr_rule == "inverse_width":
        scale = base.model.hidden_size / hidden
        return lr * scale, min_lr * scale
    if spec.lr_rule == "deepseek":
        new = 0.3118 * budget ** -0.125
        return new, new * min_lr / lr
    return lr, min_lr


def make_plan(spec: PlanSpec):
    """(runs, skipped, base RunConfig). `skipped` lists (name, reason) for runs left out."""
    from ..run_config import load_run_config, parse_overrides
    from ..vocab import require_vocab_size

    if spec.batch_rule not in BATCH_RULES:
        raise ConfigError(f"batch rule {spec.batch_rule!r}: choose one of {', '.join(BATCH_RULES)}")
    if spec.lr_rule not in LR_RULES:
        raise ConfigError(f"lr rule {spec.lr_rule!r}: choose one of {', '.join(LR_RULES)}")
    user_keys = {item.split("=", 1)[0].strip() for item in spec.overrides}
    clash = sorted(user_keys & set(PLANNED_KEYS))
    if clash:
        raise ConfigError(f"--set {', '.join(clash)}: the plan sets these for every run")
    parse_overrides(spec.overrides)  # syntax errors now
    base = load_run_config(spec.preset, spec.overrides)
    require_vocab_size(base)  # the FLOPs and parameter counts need it: from the tokenizer when the preset has none
    seq, micro = base.model.seq_length, base.train.micro_batch_size
    runs, skipped = [], []
    for fam_spec in spec.families:
        fam_over = parse_family(fam_spec)
        for budget in sorted(spec.budgets):
            candidates = []
            for depth in sorted(spec.depths):
                shape = spec.shape.shape(depth)
                model = replace(base.model, variant=fam_over["model.variant"],
                                lambda_mode=fam_over["model.lambda_mode"], **shape)
                model.validate(base.parallel)
                candidates.append((depth, shape, model))
            if spec.per_budget:
                candidates = _centred(candidates, budget, spec)
            for depth, shape, model in candidates:
                family = family_label(model)
                name = f"{family}-C{budget:.2e}-L{depth}"
                acc = account(model)
                f_rule = flops_per_token(model, spec.flops_rule)
                d_planned = budget / f_rule
                gbs = (_rounded_batch(0.292 * budget ** 0.3271, seq, micro) if spec.batch_rule == "deepseek"
                       else base.train.global_batch_size)
                steps = round(d_planned / (gbs * seq))
                if steps < spec.min_steps:
                    skipped.append((name, f"{steps} steps < min_steps={spec.min_steps}"))
                    continue
                lr, min_lr = _lr(spec, base, shape["hidden_size"], budget)
                warmup = min(steps - 1, max(1, round(spec.warmup_frac * steps)))
                run = PlannedRun(
                    name=name, family=family, budget=budget, depth=depth, shape=shape,
                    N_nonembed=acc.N_nonembed, N_total=acc.N_total, flops_per_token=f_rule,
                    flops_per_token_exact=acc.flops_per_token, tokens_planned=d_planned, steps=steps,
                    global_batch_size=gbs, tokens=steps * gbs * seq, compute=f_rule * steps * gbs * seq,
                    lr=lr, min_lr=min_lr, warmup=warmup)
                run.line = format_line(spec.preset, _overrides(spec, run, base, fam_over))
                runs.append(run)
    return runs, skipped, base


def _centred(candidates, budget, spec):
    """The `per_budget` sizes around the one whose tokens-per-parameter is nearest the target."""
    def ratio(model):
        acc = account(model)
        return budget / flops_per_token(model, spec.flops_rule) / acc.N_total

    errors = [abs(math.log(ratio(m) / spec.tokens_per_param)) for _, _, m in candidates]
    best = errors.index(min(errors))
    k = min(spec.per_budget, len(candidates))
    start = min(max(0, best - k // 2), len(candidates) - k)
    return candidates[start:start + k]


def _overrides(spec: PlanSpec, run: PlannedRun, base, fam_over) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for item in spec.overrides:
        key, value = item.split("=", 1)
        out[key.strip()] = value
    run_dir = Path(spec.runs_dir) / run.name
    out.update({"name": run.name, **fam_over})
    out.update({f"model.{k}": v for k, v in run.shape.items()})
    out.update({
        "train.train_steps": run.steps, "train.global_batch_size": run.global_batch_size,
        "train.log_interval": min(base.train.log_interval, max(1, run.steps // 10)),
        "optim.lr": float(f"{run.lr:.6g}"), "optim.min_lr": float(f"{run.min_lr:.6g}"),
        "optim.lr_warmup_steps": run.warmup,
        "logging.dir": str(run_dir), "checkpoint.dir": str(run_dir / "ckpt") if spec.checkpoints else None,
    })
    if spec.checkpoints:
        # the fit reads metrics.jsonl only; a resume (and a SLURM resubmission's "finished" test) needs the newest
        # checkpoint alone: keep one per run (the user's --set checkpoint.keep_last=K wins)
        out.setdefault("checkpoint.keep_last", 1)
    return out


def header(spec: PlanSpec, runs: List[PlannedRun], skipped, base) -> List[str]:
    seq = base.model.seq_length
    lines = [
        "IsoFLOP sweep (rf_megatron.scaling.plan). One run per non-comment line:",
        "  python pretrain/pretrain_resformer.py --config <line>",
        f"preset: {spec.preset}; user overrides: {' '.join(spec.overrides) or '(none)'}",
        f"families: {', '.join(spec.families)}; depths: {spec.depths}",
        f"shape rule: {spec.shape.describe()}",
        f"budgets C (FLOPs): {', '.join(f'{c:.3g}' for c in sorted(spec.budgets))}",
        f"tokens: D = C / F(N), F = training FLOPs per token by rule `{spec.flops_rule}` "
        "(exact: forward+backward matmuls incl. attention s x s and logits; 6N: 6 x non-embedding "
        "params; 6N_total: 6 x all params)",
        f"steps = round(D / (global_batch * {seq})); runs with fewer than {spec.min_steps} steps are skipped",
        f"batch rule `{spec.batch_rule}`: " + ("preset global batch "
                                                f"{base.train.global_batch_size} x {seq} tokens"
                                                if spec.batch_rule == "fixed" else
                                                "B_tokens = 0.292 * C^0.3271 (DeepSeek LLM), whole micro batches"),
        f"lr rule `{spec.lr_rule}`: " + {"fixed": f"lr {base.optim.lr:g} -> min_lr {base.optim.min_lr:g}",
                                          "inverse_width": f"lr = {base.optim.lr:g} * {base.model.hidden_size} / hidden"
                                                           ", min_lr keeps its ratio",
                                          "deepseek": "lr = 0.3118 * C^-0.125 (DeepSeek LLM), min_lr keeps "
                                                      "the preset's ratio"}[spec.lr_rule],
        f"schedule: {base.optim.lr_decay_style} over each run's own steps; warmup = "
        f"max(1, round({spec.warmup_frac:g} * steps))",
    ]
    keep = next((o.split("=", 1)[1] for o in spec.overrides if o.split("=", 1)[0].strip() == "checkpoint.keep_last"), 1)
    lines.append(f"checkpoints: RUNS_DIR/<name>/ckpt, the newest {keep} kept (an interrupted run resumes; the fit "
                 "reads only metrics.jsonl)" if spec.checkpoints else "checkpoints: none (checkpoint.dir=null)")
    if spec.per_budget:
        lines.append(f"sizes per budget: {spec.per_budget}, centred on D/N_total = {spec.tokens_per_param:g}")
    lines.append(f"{'name':<34} {'N_nonembed':>11} {'N_total':>11} {'F/token':>10} {'tokens':>11} {'steps':>6} {'C_real':>9}")
    for r in runs:
        lines.append(f"{r.name:<34} {r.N_nonembed:>11,} {r.N_total:>11,} {r.flops_per_token:>10.4g} "
                     f"{r.tokens:>11,} {r.steps:>6} {r.compute:>9.3g}")
    for name, reason in skipped:
        lines.append(f"skipped {name}: {reason}")
    return ["# " + line for line in lines]


def write_sweep(path, spec: PlanSpec, runs: List[PlannedRun], skipped, base) -> None:
    """`path` (header + one line per run) and `path.json` (the plan, machine readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header(spec, runs, skipped, base) + [r.line for r in runs]) + "\n")
    meta = {"spec": {**asdict(spec), "shape": asdict(spec.shape)}, "runs": [asdict(r) for r in runs],
            "skipped": [{"name": n, "reason": why} for n, why in skipped]}
    Path(f"{path}.json").write_text(json.dumps(meta, indent=1))
