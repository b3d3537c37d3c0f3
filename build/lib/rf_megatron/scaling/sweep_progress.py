"""What a local sweep is doing while its runs train: each run's step lines, shortened and prefixed with the run's
name, and after each run the sweep's count, elapsed time and ETA. Runs of one IsoFLOP budget cost the same
compute, not the same time per run, so the ETA weighs each run by its planned FLOPs."""
from __future__ import annotations

import re
import threading
import time
from typing import Dict, Optional

from ..run_summary import duration

STEP_LINE = re.compile(r"^step\s+(\d+)(/\d+)?\s*\|")


def short_step_line(name: str, line: str) -> Optional[str]:
    """`name: step 5/20 | loss 4.1234 | elapsed 3s, ETA 9s` from a trainer step line (validation lines keep their
    loss and scope); None for any other line."""
    line = line.strip()
    if not STEP_LINE.match(line):
        return None
    fields = [f.strip() for f in line.split("|")]
    head = re.sub(r"\s+", " ", fields[0])
    if len(fields) > 2 and fields[1].startswith("loss "):  # a training step: its loss and the run's own ETA
        return f"{name}: {head} | {fields[1]} | {fields[-1]}"
    return f"{name}: {' | '.join([head, *fields[1:3]])}"


def run_cost(cfg) -> float:
    """Planned training FLOPs of a run (its weight in the sweep's ETA); 1 when it cannot be counted."""
    try:
        from .accounting import flops_per_token

        t = cfg.train
        return flops_per_token(cfg.model) * t.train_steps * t.global_batch_size * cfg.model.seq_length
    except Exception:  # noqa: BLE001 (an estimate only: never stop a sweep for it)
        return 1.0


class SweepProgress:
    """Counts finished and failed runs against the planned total and says so, with elapsed time and ETA."""

    def __init__(self, costs: Dict[str, float], echo=print, clock=time.time):
        self.costs, self.echo, self.clock = dict(costs), echo, clock
        self.start, self.done, self.failed, self.done_cost = clock(), 0, 0, 0.0
        self.lock = threading.Lock()

    def finished(self, name: str, ok: bool) -> str:
        """Record one run's end; return (and echo) the sweep's status line."""
        with self.lock:
            self.done += 1
            self.failed += not ok
            self.done_cost += self.costs.get(name, 0.0)
            elapsed = self.clock() - self.start
            left = sum(self.costs.values()) - self.done_cost
            eta = elapsed * left / self.done_cost if self.done_cost > 0 else 0.0
            failed = f", {self.failed} failed" if self.failed else ""
            line = (f"sweep: {self.done}/{len(self.costs)} runs done{failed}, elapsed {duration(elapsed)}, "
                    f"ETA {duration(eta) if left > 0 else '0s'}")
            self.echo(line)
            return line

    def say(self, line: str) -> None:
        with self.lock:
            self.echo(line)
