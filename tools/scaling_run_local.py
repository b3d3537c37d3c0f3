#!/usr/bin/env python
"""Run a sweep file (tools/scaling_plan.py) locally, one run after another (`--jobs N`: N at once), skipping
finished runs.

    python tools/scaling_run_local.py sweep.txt --nproc 1          # one process per run
    python tools/scaling_run_local.py sweep.txt --nproc 2 --only resformer
    python tools/scaling_run_local.py sweep.txt --jobs 2           # two one-process runs at a time

Each run's console output goes to <logging.dir>/stdout.log; its step lines are shown prefixed with the run's
name, and each finished run prints the sweep's count, elapsed time and ETA. Exit code 1 if any run failed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_megatron.scaling.local_runner import parse_ports, run_sweep  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep")
    p.add_argument("--nproc", type=int, default=1, help="processes per run")
    p.add_argument("--launcher", choices=("auto", "python", "torchrun"), default="auto",
                   help="auto: python for --nproc 1, torchrun otherwise")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (with GPUs each gets its own --nproc devices via CUDA_VISIBLE_DEVICES)")
    p.add_argument("--only", help="run only lines whose run name contains this")
    p.add_argument("--dry-run", action="store_true", help="print the commands")
    p.add_argument("--ports", help="LO-HI: rendezvous ports only from this range (default: any free port)")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    try:
        ports = parse_ports(a.ports) if a.ports else None
    except ValueError as exc:
        p.error(str(exc))
    outcomes = run_sweep(a.sweep, a.nproc, a.launcher, a.only, a.dry_run, jobs=a.jobs, ports=ports)
    failed = [o.name for o in outcomes if o.status == "failed"]
    done = sum(o.status == "finished" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    print(f"{done} ran, {skipped} already finished, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
