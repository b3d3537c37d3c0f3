"""Stop cleanly on SIGTERM / SIGUSR1 or a wall-time limit, with every rank agreeing.

A signal reaches ranks at different moments (or only some of them); each rank records it and,
once per step, all ranks take the max of their flags, so they all save the same step and exit
together (Megatron-LM's exit-signal-handler behaviour).
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist


class ExitSignals:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), max_minutes=None):
        self.received = None
        self.start = time.time()
        self.max_seconds = max_minutes * 60 if max_minutes else None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
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
