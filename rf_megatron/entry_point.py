"""What both pretrain/ scripts run around a trainer: the early exit of a finished run, one `error:` line for a
config error, the training itself, a clean shutdown, and how to resume when the run stopped early."""
from __future__ import annotations

import os
import sys
from typing import Callable

from .resume import AlreadyFinished
from .training_loop import TrainingLoop, TrainingStopped


def run_entry_point(build: Callable[[], "TrainingLoop"]) -> int:
    """What both pretrain/ scripts do: build the trainer (a ConfigError -> one `error:` line, exit 2),
    train, shut down; say how to resume when the run stopped early."""
    from . import child_lifetime
    from .child_lifetime import exit_now
    from .config import ConfigError
    from .quiet import silence_known_warnings

    silence_known_warnings()
    child_lifetime.install()  # helper processes (checkpoint writers) never outlive the trainer
    try:
        trainer = build()
    except AlreadyFinished as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(exc), flush=True)
        return 0
    except ConfigError as exc:
        # Config errors are the same on every rank: rank 0 says it. A damaged checkpoint file may fail on
        # one rank only (the one reading it), while the others wait in a collective: that rank says it.
        if int(os.environ.get("RANK", "0")) == 0 or getattr(exc, "every_rank", False):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        result = trainer.train()
    except TrainingStopped as exc:  # every rank sees the same (global) loss / grad norm and stops here
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        exit_now(1)
    except BaseException:
        # Report now: the other ranks may be blocked in a collective that this rank left, and a
        # clean shutdown (a barrier) would hang; the launcher tears the job down on our exit code.
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        exit_now(1)
    trainer.close()
    if "stopped" in result and result.get("saved") and int(os.environ.get("RANK", "0")) == 0:
        # under SLURM the job script says what comes next (slurm/pretrain.sbatch: requeue, or resubmit)
        how = "checkpoint saved" if os.environ.get("SLURM_JOB_ID") else "rerun the same command to resume"
        print(f"stopped at step {result['step']} ({result['stopped']}); {how}", flush=True)
    return 0
