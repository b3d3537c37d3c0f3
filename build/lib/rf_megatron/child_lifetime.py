"""Nothing of a job outlives it: helper processes die with the trainer (and `exit_now` takes them along).

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


def exit_now(code: int) -> None:
    """Exit without the normal shutdown, taking our helper processes along (the checkpoint writer's
    multiprocessing Manager would otherwise outlive us, holding the launcher's output pipes open)."""
    import psutil

    _release_run_lock()
    sys.stdout.flush()
    sys.stderr.flush()
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(code)


def exit_process(code: int) -> None:
    """An entry point's last call: `sys.exit(code)`, except that with a process group still up (a run that stopped
    on a config error after building it) the interpreter's teardown is skipped: with gloo's threads alive it can
    abort in C++ ("terminate called without an active exception", exit -6 instead of 2; seen once in CI)."""
    _release_run_lock()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        exit_now(code)
    sys.exit(code)


def _release_run_lock() -> None:
    """A run's checkpoint-directory lock goes with its process, however it ends (rf_megatron/run_lock.py)."""
    run_lock = sys.modules.get("rf_megatron.run_lock")
    if run_lock is not None:
        run_lock.release()
