"""Stop cleanly on SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) or a wall-time limit, with every rank agreeing.

A signal reaches ranks at different moments (or only some of them); each rank records it and,
once per step, all ranks take the max of their flags, so they all save the same step and exit
together (Megatron-LM's exit-signal-handler behaviour). A second SIGINT is a user who will not wait for
the save: the process exits at once (the previous checkpoint stays the one `latest` names).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from .console import is_rank0

INTERRUPTED = 130  # a shell's exit code for a process ended by SIGINT


class ExitSignals:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT), max_minutes=None):
        self.received = None
        self.start = time.time()
        self.max_seconds = max_minutes * 60 if max_minutes else None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == "SIGINT":
            if is_rank0():
                print("second interrupt: exiting now, without saving", file=sys.stderr, flush=True)
            from .child_lifetime import exit_now

            exit_now(INTERRUPTED)
        if signum == signal.SIGINT and self.received is None and is_rank0():
            # os.write: print() is not safe in a handler that may interrupt another print
            os.write(2, b"interrupt: finishing the step and saving (Ctrl-C again exits at once, without saving)\n")
        self.received = signal.Signals(signum).name

    def should_exit(self) -> str:
        """Collective: '' to go on, else the reason every rank agrees on."""
        timed_out = self.max_seconds is not None and time.time() - self.start > self.max_seconds
        from .device import current_device

        flags = torch.tensor([self.received is not None, timed_out], dtype=torch.int32, device=current_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return f"signal {self.received or 'received on another rank'}"
        if flags[1]:
            return f"time limit of {self.max_seconds / 60:g} min"
        return ""

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
