"""What both pretrain/ scripts run around a trainer: one process when no launcher started it, the early exit of a
finished run, one `error:` line for a config error, the training itself, a clean shutdown, the closing summary, and
how to resume when the run stopped early."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

from . import child_lifetime, run_lock
from .child_lifetime import exit_now
from .console import is_rank0
from .errors import ConfigError
from .launch import report_exit
from .quiet import silence_known_warnings
from .resume import AlreadyFinished
from .signals import INTERRUPTED
from .single_process import default_to_one_process
from .training_loop import TrainingLoop, TrainingStopped

RANK0_GRACE_SECONDS = 30  # how long a rank waits for rank 0 to say an error they share


def run_entry_point(build: Callable[[], "TrainingLoop"]) -> int:
    """What both pretrain/ scripts do: build the trainer (a ConfigError -> one `error:` line, exit 2),
    train, shut down; say how to resume when the run stopped early. The exit code also goes to our launcher
    (rf_megatron/launch.py), which a stop signal would otherwise leave guessing."""
    code = _run(build)
    report_exit(code)
    return code


def _run(build: Callable[[], "TrainingLoop"]) -> int:
    silence_known_warnings()
    child_lifetime.install()  # helper processes (checkpoint writers) never outlive the trainer
    try:
        default_to_one_process()  # a plain `python pretrain/...` launch: rank 0 of 1
        trainer = build()
    except AlreadyFinished as exc:
        if is_rank0():
            print(str(exc), flush=True)
        return 0
    except ConfigError as exc:
        _say_once(exc)
        run_lock.release()  # a caller in this process (a test, a notebook) may start another run here
        return 2
    except KeyboardInterrupt:
        _interrupted_before_training()
    try:
        result = trainer.train()
    except TrainingStopped as exc:  # every rank sees the same (global) loss / grad norm and stops here
        _say_once(exc)
        exit_now(1)
    except ConfigError as exc:  # a choice that fails at the first step (torch.compile without a compiler)
        _say_once(exc)
        exit_now(2)
    except KeyboardInterrupt:
        _interrupted_before_training()
    except BaseException:
        # Report now: the other ranks may be blocked in a collective that this rank left, and a
        # clean shutdown (a barrier) would hang; the launcher tears the job down on our exit code.
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        exit_now(1)
    trainer.close()  # the logging backends closed in train(): the summary comes after their output
    if is_rank0():
        print(trainer.closing_summary(result), flush=True)
    if "stopped" in result and result.get("saved") and is_rank0():
        # under SLURM the job script says what comes next (slurm/pretrain.sbatch: requeue, or resubmit)
        how = "checkpoint saved" if os.environ.get("SLURM_JOB_ID") else "rerun the same command to resume"
        print(f"stopped at step {result['step']} ({result['stopped']}); {how}", flush=True)
    return 0


def _say_once(error: Exception) -> None:
    """One `error:` line for the job. Config errors and training stops are the same on every rank: rank 0 says
    them. A damaged checkpoint file may fail on one rank only (the one reading it), or a save on one rank
    (`every_rank`), while the others wait in a collective: that rank says it."""
    if is_rank0() or getattr(error, "every_rank", False):
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        _leave_it_to_rank0(error)


def _leave_it_to_rank0(error: Exception) -> None:
    """Rank 0 says an error every rank has. This rank may have got there first, and exiting now would have the
    launcher (torchrun, srun --kill-on-bad-exit) kill rank 0 before its line is out: no line at all. So wait for
    rank 0's exit to end this rank; should it not come (rank 0 did not get the error: a file only this node
    lacks), say it here."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(RANK0_GRACE_SECONDS)
        print(f"error: {error} (rank {os.environ.get('RANK')})", file=sys.stderr, flush=True)


def _interrupted_before_training() -> None:
    """Ctrl-C before the step loop took SIGINT over (rf_megatron/signals.py): one line, no traceback."""
    if is_rank0():
        print("interrupted before the first step: nothing to save", file=sys.stderr, flush=True)
    exit_now(INTERRUPTED)
