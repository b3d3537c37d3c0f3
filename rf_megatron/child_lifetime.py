"""Nothing of a job outlives it: helper processes die with the trainer.

Megatron's dist_checkpointing keeps helper processes (a multiprocessing Manager, checkpoint writers). When a
rank is killed with SIGKILL (OOM killer, `scancel --signal=KILL`, slurmd after a failed step), they are re-parented
to init and live on, holding the job step's output open, so slurmd waits 60 s ("Abandoning IO") before every
requeue. Linux's PR_SET_PDEATHSIG makes the kernel kill a child when its parent dies; it is not inherited across
fork, so every multiprocessing child sets it for itself right after it starts (`install` registers that hook).
Spawned children (dist_checkpointing's Manager uses the spawn context) run no after-fork hooks; they start a fresh
interpreter that re-imports the parent's main script as `__mp_main__`, so entry points call `install()` at import
time and it sets the signal right there.
"""
from __future__ import annotations

import ctypes
import multiprocessing.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


class _Hook:
    """multiprocessing keeps after-fork hooks in a weak registry: this object lives as long as the module."""


_HOOK = _Hook()


def die_with_parent(_=None) -> None:
    """In a child process: be killed (SIGKILL) when the parent process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None and os.getppid() != parent.pid:
        os._exit(0)  # the parent died between fork and prctl


def install() -> None:
    """Every multiprocessing child started from now on dies with its parent (Linux; elsewhere a no-op).
    Idempotent."""
    if not sys.platform.startswith("linux"):
        return
    multiprocessing.util.register_after_fork(_HOOK, die_with_parent)  # fork children; twice is harmless
    if "__mp_main__" in sys.modules:  # we are a spawned child re-importing the main script: hooks do not run here
        die_with_parent()
