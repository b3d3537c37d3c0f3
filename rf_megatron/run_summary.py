"""What a run tells its user as it goes and when it ends: elapsed time / ETA on the step lines, and a closing summary
(what was trained, the final losses, where the checkpoint and metrics are, and the commands that come next) printed
by rank 0 after the logging backends have closed, so it is the last thing on the screen."""
from __future__ import annotations

from typing import Dict, List, Optional


def duration(seconds: float) -> str:
    """3s, 4m05s, 2h03m: short enough for every step line."""
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress(step: int, last_step: int, first_step: int, seconds: float) -> str:
    """`elapsed 1m02s, ETA 3m10s`: the ETA extrapolates this process's pace (steps since it started or resumed,
    evaluations and checkpoints included) over the steps left."""
    done = step - first_step
    eta = seconds / done * (last_step - step) if done > 0 else 0.0
    return f"elapsed {duration(seconds)}, ETA {duration(eta)}"


def count(n: int) -> str:
    """98,304 / 12.3M / 2.10B: a token count that stays short on a step line."""
    for scale, unit, start in ((1e9, "B", 1e9), (1e6, "M", 1e7)):
        if n >= start:
            return f"{n / scale:.3g}{unit}" if n < 1000 * scale else f"{n / scale:,.0f}{unit}"
    return f"{n:,}"


def eval_scope(tokens: int, whole: bool, hint: bool = True) -> str:
    """How much of a held-out set a loss covers: a validation loss from a sample differs from a full evaluation."""
    if whole:
        return f"{tokens:,} tokens, the whole set"
    return f"{tokens:,} tokens, a sample" + (" (train.eval_full=true scores the whole set)" if hint else "")


def next_commands(cfg, engine: str) -> List[str]:
    """The commands a user runs next, with this run's own paths filled in."""
    ckpt, data = cfg.checkpoint.dir, cfg.data
    lines = []
    if engine == "deepspeed":
        hf = cfg.deepspeed.hf_output or f"{cfg.logging.dir}/hf"
        lines.append(f"  HF folder   {hf} (written by this run)")
    elif ckpt:
        hf = f"{cfg.logging.dir}/hf"
        lines.append(f"  export      python tools/convert_checkpoint_to_hf.py --checkpoint {ckpt} --output {hf}")
    else:
        return lines
    if data.valid_paths and len(data.valid_paths) == 1:
        source = f" --perplexity {data.valid_paths[0]}"
    elif len(data.paths) == 1:
        source = f" --perplexity {data.paths[0]} --split {data.split}"
    else:  # a blend: the harness tasks still apply
        source = " --tasks hellaswag"
    lines.append(f"  evaluate    python tools/evaluate.py {hf}{source}")
    return lines


def summary(cfg, engine: str, outcome: Dict, seconds: float) -> str:
    """The closing lines. `outcome`: step, tokens, train_loss (mean, first step, last step), valid_loss /
    valid_tokens / valid_whole, checkpoint (the last one saved or resumed, or None), stopped (the reason, for a run
    that stopped early)."""
    t = cfg.train
    head = "stopped" if outcome.get("stopped") else "evaluated" if t.eval_only else "finished"
    losses = []
    if outcome.get("train_loss") is not None:
        loss, first, last = outcome["train_loss"]  # the last logged window's mean: say which steps it is
        losses.append(f"train loss {loss:.4f} ({f'step {last}' if first == last else f'steps {first}-{last}'})")
    if outcome.get("valid_loss") is not None:
        losses.append(f"validation loss {outcome['valid_loss']:.4f} "
                      f"({eval_scope(outcome['valid_tokens'], outcome['valid_whole'], hint=False)})")
    step = f"step {outcome['step']}" + ("" if t.eval_only else f"/{t.train_steps}")  # an evaluation has no goal
    lines = [f"{head}: {step}, {outcome['tokens']:,} tokens, {duration(seconds)} "
             f"(this process)" + (f"; {', '.join(losses)}" if losses else "")]
    checkpoint: Optional[str] = outcome.get("checkpoint")
    none = f"none (nothing saved in {cfg.checkpoint.dir})" if cfg.checkpoint.dir else "none (checkpoint.dir=null)"
    lines.append(f"  checkpoint  {checkpoint or none}")
    lines.append(f"  metrics     {cfg.logging.dir}/metrics.jsonl")
    if outcome.get("stopped"):
        return "\n".join(lines)  # the resume line follows (entry_point)
    if checkpoint and not t.eval_only:
        lines.append(f"  train on    the same command with train.train_steps={2 * t.train_steps} (resumes at step "
                     f"{outcome['step']}; the LR schedule stretches)")
    if checkpoint or engine == "deepspeed":  # nothing to export from an empty checkpoint.dir
        lines.extend(next_commands(cfg, engine))
    return "\n".join(lines)
