"""Which checkpoints hold healthy weights, and rewinding past those that do not.

A checkpoint's weights are judged by the step that follows it: that step's loss and gradients are computed
from them. If they are finite and the loss is no spike (train.loss_spike_factor x the mean of the recent
losses), the checkpoint is healthy; a non-finite value or a spike marks it unhealthy. The verdicts live in
`health.json` beside the checkpoints (rank 0 writes it, atomically); each checkpoint's train_state.json also
records the steps before it (finite or not, largest loss and grad norm, spikes).

When a run diverges, its stop message names the newest healthy checkpoint. `checkpoint.rewind_to_healthy=true`
then resumes from it: the newer checkpoints are moved aside (`unhealthy-iter_N-<time>/`, nothing is deleted)
and the data the diverging steps read is skipped (what OLMo and Megatron-LM users do by hand). The skip is
recorded with the checkpoint, so a requeued job resuming there again skips the same batches.
"""
from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .checkpoint_dir import (HEALTH, barrier, complete_checkpoints, newest_healthy, point_latest,  # noqa: F401
                             read_health, step_of)

RECENT = 10  # losses a spike is measured against


def _write_health(root, records: Dict[str, Dict]) -> None:
    root = Path(root)
    live = {p.name for p in complete_checkpoints(root)}
    tmp = root / f"{HEALTH}.tmp"
    tmp.write_text(json.dumps({k: v for k, v in sorted(records.items()) if k in live}, indent=1))
    tmp.replace(root / HEALTH)


class HealthMonitor:
    """Watches every step's global loss and grad norm (the same on every rank); rank 0 writes the verdicts."""

    def __init__(self, root: Optional[str], spike_factor: float, writer: bool):
        self.root, self.spike_factor, self.writer = Path(root) if root else None, spike_factor, writer
        self.recent = deque(maxlen=RECENT)
        self.pending: List[str] = []  # checkpoints saved (or resumed) whose next step has not run yet
        self._reset_window()

    def _reset_window(self) -> None:
        self.window = {"finite": True, "max_loss": None, "max_grad_norm": None, "spikes": 0}

    def problem(self, step: int, loss: float, grad_norm: float) -> Optional[str]:
        if not math.isfinite(loss):
            return f"loss {loss} at step {step}"
        if not math.isfinite(grad_norm):
            return f"grad norm {grad_norm} at step {step}"
        if self.spike_factor and len(self.recent) and loss > self.spike_factor * (mean := sum(self.recent) / len(self.recent)):
            return f"loss spike at step {step} ({loss:.4g} > {self.spike_factor:g} x the recent mean {mean:.4g})"
        return None

    def observe(self, step: int, loss: float, grad_norm: float, applied: bool = True) -> Optional[str]:
        """After a step: judge the checkpoints it started from; return the problem, if any."""
        problem = self.problem(step, loss, grad_norm)
        w = self.window
        w["finite"] = w["finite"] and math.isfinite(loss) and (math.isfinite(grad_norm) or not applied)
        for key, value in (("max_loss", loss), ("max_grad_norm", grad_norm)):
            if math.isfinite(value):
                w[key] = value if w[key] is None else max(w[key], value)
        if problem is None:
            self.recent.append(loss)
        elif math.isfinite(loss) and math.isfinite(grad_norm):  # finite values: the problem is a spike
            w["spikes"] += 1
        self._judge(step, problem)
        return problem

    def failed(self, step: int, problem: str) -> None:
        """A step whose loss or gradients are not finite, found inside the engine's step."""
        self.window["finite"] = False
        self._judge(step, problem)

    def _judge(self, step: int, problem: Optional[str]) -> None:
        if not self.pending or self.root is None:
            self.pending = []
            return
        if self.writer:
            records = read_health(self.root)
            for name in self.pending:
                record = records.setdefault(name, {"step": step_of(Path(name))})
                record.update({"healthy": problem is None, "judged_by_step": step})
                if problem:
                    record["why"] = problem
            _write_health(self.root, records)
        self.pending = []

    def saved(self, name: str) -> None:
        """A checkpoint `name` was just committed: it waits for the next step's verdict."""
        self.pending.append(name)
        self._reset_window()

    def window_record(self) -> Dict:
        """What the steps since the last checkpoint looked like (for the next checkpoint's train_state.json)."""
        return dict(self.window)

    def stop_advice(self, bad_step: int) -> str:
        """Where to resume a diverged run from, for its stop message."""
        if self.root is None:
            return "no checkpoint.dir: nothing to resume"
        healthy = newest_healthy(self.root)
        if healthy is None:
            return "no checkpoint of this run is known healthy (start over with a lower optim.lr)"
        steps = f"steps {step_of(healthy) + 1}-{bad_step}" if bad_step > step_of(healthy) + 1 else f"step {bad_step}"
        return (f"the newest healthy checkpoint is {healthy.name}: rerun with checkpoint.rewind_to_healthy=true to "
                f"resume from it skipping the data of {steps} (and lower optim.lr or check that data)")


def rewind(root, latest: Path, say: Callable[[str], None], rank0: bool) -> Path:
    """checkpoint.rewind_to_healthy: the newest checkpoint not marked unhealthy, newer ones moved aside and the
    data window of the divergence recorded as skipped. Every rank computes the same answer; rank 0 moves files."""
    from .config import ConfigError

    root = Path(root)
    records = read_health(root)
    candidates = [p for p in complete_checkpoints(root) if step_of(p) <= step_of(latest)]
    bad = [p for p in candidates if records.get(p.name, {}).get("healthy") is False]
    if not bad:
        return latest
    keep = [p for p in candidates if step_of(p) < step_of(bad[0]) and records.get(p.name, {}).get("healthy") is True]
    if not keep:
        raise ConfigError(f"checkpoint.rewind_to_healthy: no checkpoint in {root} before {bad[0].name} is known "
                          "healthy; set checkpoint.start_over=true to start again")
    target = keep[-1]
    bad_step = max(records[p.name].get("judged_by_step", step_of(p) + 1) for p in bad)
    skip = bad_step - step_of(target)
    barrier()  # every rank has read the directory before rank 0 changes it
    if rank0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for p in candidates:
            if step_of(p) > step_of(target):
                p.rename(root / f"unhealthy-{p.name}-{stamp}")
        records[target.name]["skip_batches"] = skip
        records[target.name]["skip_steps"] = [step_of(target) + 1, bad_step]
        point_latest(root, target.name)
        _write_health(root, records)
    barrier()
    say(f"checkpoint.rewind_to_healthy: resuming from {target.name} (the newer checkpoints moved aside as "
        f"unhealthy-*), skipping the {skip} global batch(es) that steps {step_of(target) + 1}-{bad_step} read")
    return target


def batches_to_skip(checkpoint: Optional[Path]) -> int:
    """Global batches to skip when resuming from `checkpoint` (set by a rewind to it)."""
    if checkpoint is None:
        return 0
    return int(read_health(checkpoint.parent).get(checkpoint.name, {}).get("skip_batches", 0))
