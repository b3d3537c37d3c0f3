"""Run a sweep file on this machine, `--jobs` runs at a time (default one after the other), skipping runs
already finished.

The launch is the one a SLURM array task makes (`pretrain/pretrain_resformer.py --config <line>`),
under torchrun for several processes, or as a plain single process (with the rendezvous
variables torchrun would set) for `--nproc 1`, which saves torchrun's extra interpreter. A run
that fails is reported and the next one starts; an interrupted run resumes from its checkpoint
when launched again (the trainer resumes automatically). While runs train, their step lines are shown
shortened and prefixed with the run's name (the full output goes to <logging.dir>/stdout.log), and each
finished run prints the sweep's count, elapsed time and ETA (rf_megatron/scaling/sweep_progress.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..ports import free_port, parse_ports  # noqa: F401 (parse_ports: tools/scaling_run_local.py's --ports)
from .sweep import is_finished, load_line, parse_line, run_lines
from .sweep_progress import SweepProgress, run_cost, short_step_line

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "pretrain" / "pretrain_resformer.py"


def command(line: str, nproc: int, launcher: str = "auto", python: str = sys.executable,
            ports: Optional[range] = None):
    """(argv, extra env) that run one sweep line (its rendezvous port from `ports` when given)."""
    preset, overrides = parse_line(line)
    args = [str(TRAIN), "--config", preset, *overrides]
    port = str(free_port(ports))
    if launcher == "auto":
        launcher = "python" if nproc == 1 else "torchrun"
    if launcher == "python":
        if nproc != 1:
            raise ValueError("--launcher python runs one process: use torchrun for --nproc > 1")
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        return [python, *args], env
    return [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={port}", *args], {}


@dataclass
class Outcome:
    name: str
    status: str  # finished | skipped | failed
    seconds: float = 0.0
    log: Optional[str] = None


def run_sweep(sweep_file, nproc: int = 1, launcher: str = "auto", only: Optional[str] = None,
              dry_run: bool = False, env: Optional[dict] = None, echo=print, jobs: int = 1,
              ports: Optional[range] = None) -> List[Outcome]:
    """Run the sweep's unfinished lines, `jobs` at a time (each in its own slot of `nproc` devices:
    CUDA_VISIBLE_DEVICES is set per slot when jobs > 1)."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    outcomes, todo = [], []
    lines = run_lines(sweep_file)
    for i, line in enumerate(lines):
        cfg = load_line(line)
        if only and only not in cfg.name:
            continue
        if is_finished(cfg.logging.dir, cfg.train.train_steps):
            echo(f"[{i + 1}/{len(lines)}] {cfg.name}: finished, skipping")
            outcomes.append(Outcome(cfg.name, "skipped"))
            continue
        if dry_run:
            echo(" ".join(command(line, nproc, launcher, ports=ports)[0]))
            continue
        todo.append((i, line, cfg))

    progress = SweepProgress({cfg.name: run_cost(cfg) for _, _, cfg in todo}, echo=echo)
    slots: "queue.Queue[int]" = queue.Queue()
    for slot in range(max(jobs, 1)):
        slots.put(slot)
    lock = progress.lock  # one lock for every line the sweep prints

    def run_one(i, line, cfg):
        slot = slots.get()
        try:
            # concurrent runs take their ports from disjoint slices of the range
            argv, extra = command(line, nproc, launcher, ports=ports[slot::max(jobs, 1)] if ports else None)
            if jobs > 1:
                extra = {**extra, "CUDA_VISIBLE_DEVICES": ",".join(str(slot * nproc + d) for d in range(nproc))}
            log = Path(cfg.logging.dir) / "stdout.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            start = time.time()
            progress.say(f"[{i + 1}/{len(lines)}] {cfg.name}: started ({cfg.train.train_steps} steps, output in {log})")
            with open(log, "a") as out:
                proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace",
                                        env={**os.environ, "PYTHONUNBUFFERED": "1",
                                             "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                                             **(env or {}), **extra})
                for text in proc.stdout:  # the whole output to the log, the step lines to the screen
                    out.write(text)
                    out.flush()
                    short = short_step_line(cfg.name, text)
                    if short:
                        progress.say(f"  {short}")
                proc.wait()
            seconds = time.time() - start
            ok = proc.returncode == 0 and is_finished(cfg.logging.dir, cfg.train.train_steps)
            with lock:
                echo(f"[{i + 1}/{len(lines)}] {cfg.name}: "
                     f"{'finished' if ok else f'FAILED (exit {proc.returncode}, see {log})'} in {seconds:.1f}s")
                outcomes.append(Outcome(cfg.name, "finished" if ok else "failed", seconds, str(log)))
            progress.finished(cfg.name, ok)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        for future in [pool.submit(run_one, *item) for item in todo]:
            future.result()
    return outcomes
