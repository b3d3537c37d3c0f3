"""Where training metrics go: console, a JSONL file per run, Weights & Biases, TensorBoard.

Only the last pipeline stage's first TP/DP rank knows the loss; that rank writes. wandb is online
only when an API key is configured (never blocking on a network that is not there), else offline.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional


class MetricsLogger:
    def __init__(self, run_dir, run_name: str, config: Dict[str, Any], enabled: bool,
                 wandb_project: Optional[str] = None, tensorboard: bool = False, resume_step: Optional[int] = None):
        """`resume_step`: the checkpoint step a resumed run continues from (None: a fresh run)."""
        self.enabled = enabled
        self.jsonl = self.wandb = self.tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        continue_curve(run_dir / "metrics.jsonl", resume_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_project:
            self.wandb = _start_wandb(run_dir, run_name, wandb_project, config)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: Dict[str, Any], console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        if console:
            print(console, flush=True)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self._best_effort("wandb", lambda: self.wandb.log(metrics, step=step))
        if self.tb is not None:
            def scalars():
                for key, value in metrics.items():
                    if isinstance(value, (int, float)):
                        self.tb.add_scalar(key, value, step)

            self._best_effort("tb", scalars)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.wandb is not None:
            self._best_effort("wandb", self.wandb.finish)
        if self.tb is not None:
            self._best_effort("tb", self.tb.close)

    def _best_effort(self, backend: str, call) -> None:
        """wandb / TensorBoard never stop or delay training or its checkpoint: a backend that fails (e.g. wandb's
        service process killed by the same SIGTERM that asks the run to save) is dropped with one warning;
        metrics.jsonl keeps every row."""
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any failure of an optional backend
            setattr(self, backend, None)
            if backend == "wandb":
                _quiet_wandb_exit()
            name = {"wandb": "Weights & Biases", "tb": "TensorBoard"}[backend]
            print(f"warning: {name} logging failed ({type(exc).__name__}: {str(exc).strip()[:200]}); "
                  "continuing with metrics.jsonl only", file=sys.stderr, flush=True)


def _quiet_wandb_exit() -> None:
    """wandb's own exit handler (and asyncio under it) would print a traceback per dead connection after its
    service died: the failure was reported once already."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook

    def hook(unraisable):
        if not getattr(getattr(unraisable, "object", None), "__module__", "").startswith("wandb"):
            previous(unraisable)

    sys.unraisablehook = hook


def continue_curve(path: Path, resume_step: Optional[int]) -> None:
    """One curve per metrics.jsonl: a resumed run drops the rows that the interrupted run logged after its
    checkpoint (they are logged again, identically); a fresh run moves an earlier run's file aside."""
    if not path.exists() or path.stat().st_size == 0:
        return
    if resume_step is None:
        aside = path.with_name(time.strftime("metrics.previous-%Y%m%d-%H%M%S.jsonl"))
        path.rename(aside)
        print(f"note: {path} held an earlier run's metrics: moved to {aside.name}", flush=True)
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _step(line) <= resume_step]
    if len(keep) < len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
        print(f"note: {path}: dropped {len(lines) - len(keep)} row(s) logged after step {resume_step}, the step "
              "this run resumes from (it logs those steps again)", flush=True)


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a row cut off by a kill: dropped


def _start_wandb(run_dir: Path, name: str, project: str, config: Dict[str, Any]):
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: pip install wandb (logging to metrics.jsonl only)", file=sys.stderr)
        return None
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().exists()
    mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
    return wandb.init(project=project, name=name, dir=str(run_dir), config=config, mode=mode,
                      resume="allow", id=_run_id(run_dir))


def _run_id(run_dir: Path) -> str:
    """A stable wandb id per run directory, so a resumed job continues the same wandb run."""
    path = run_dir / "wandb_run_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
