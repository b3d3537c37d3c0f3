"""One run per checkpoint directory.

Two trainers writing one `checkpoint.dir` overwrite each other's `iter_N.tmp/` and `latest` (the second one's first
save fails half-way, or worse, succeeds over the first one's). Rank 0 of a run holds `checkpoint.dir/run.lock` for
the run's life: a JSON note of who holds it (host, pid, SLURM job), created with O_EXCL so only one of two racing
starts gets it. A lock whose holder is gone — its process no longer runs on this host, or it is this very SLURM job
(a requeue) — is taken over with one line; a live holder's is refused in one line naming it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, Optional

LOCK = "run.lock"
_held: Optional[Path] = None  # the lock this process holds (released on every way out of the entry point)


def _me() -> Dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(holder: Dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def _gone(holder: Dict) -> Optional[str]:
    """Why the holder is certainly not running any more (None: it may be alive)."""
    import psutil

    me = _me()
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"]:
        return "this SLURM job, requeued"
    if holder.get("host") != me["host"]:
        return None  # another node: we cannot see its processes
    pid = holder.get("pid")
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        return "its process is gone"
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return "its process is gone"
    if abs(started - float(holder.get("pid_started") or 0)) > 1:
        return "its process is gone (the pid now belongs to another process)"
    return None


def _read(path: Path) -> Optional[Dict]:
    for _ in range(20):  # a holder between create and write: give it a moment
        try:
            holder = json.loads(path.read_text())
            if isinstance(holder, dict):
                return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}  # unreadable: no process owns it


class DirectoryInUse(Exception):
    """checkpoint.dir is held by another live run."""


def acquire(root, say) -> Path:
    """Take `root/run.lock` for this process (rank 0). Raises DirectoryInUse naming a live holder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    mine = _me()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                continue  # released meanwhile
            if holder.get("pid") == mine["pid"] and holder.get("host") == mine["host"]:
                return path  # ours already (a second trainer in the same process)
            why = _gone(holder) if holder else "it is unreadable"
            if why is None:
                raise DirectoryInUse(
                    f"checkpoint.dir={root} is in use by another run ({describe(holder)}): two runs in one directory "
                    f"overwrite each other's checkpoints; point checkpoint.dir elsewhere, or if that run is gone, "
                    f"delete {path}")
            say(f"note: took over {path} from a run that is no longer running ({describe(holder)}: {why})")
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
            f.flush()
            os.fsync(f.fileno())
        global _held
        _held = path
        return path


def release() -> None:
    """Remove the lock this process holds, if any (idempotent)."""
    global _held
    path, _held = _held, None
    if path is None:
        return
    try:
        holder = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass
