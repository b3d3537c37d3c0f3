"""Rendezvous ports for the processes we launch (torchrun, DeepSpeed, the scaling sweep's local runs).

Any free port by default; `--ports LO-HI` where a firewall opens only a range (clusters' login nodes).
"""
from __future__ import annotations

import socket
from typing import Optional


def parse_ports(spec: str) -> range:
    """`LO-HI` (inclusive), e.g. 29500-29599."""
    try:
        lo, hi = (int(x) for x in spec.split("-"))
    except ValueError:
        raise ValueError(f"--ports {spec!r}: give a range LO-HI, e.g. 29500-29599") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"--ports {spec!r}: need 1024 <= LO <= HI <= 65535")
    return range(lo, hi + 1)


def free_port(ports: Optional[range] = None) -> int:
    """A port nothing listens on now: any (the OS picks), or the first free one of `ports`."""
    for port in ports or [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")
