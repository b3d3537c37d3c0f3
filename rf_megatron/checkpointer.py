"""When and how a run saves: at most one checkpoint per step, refused before anything is written when the disk
cannot hold it, cleaned up and said in one line when the disk fails mid-write, and handed to the health monitor
(the next step judges it). The engine writes its shards (`write`: the engine's `write_checkpoint`, which lands
them through checkpoint_dir.land_checkpoint, the commit protocol of both engines)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

from .checkpoint_dir import iter_name, latest_checkpoint
from .checkpoint_health import HealthMonitor
from .console import from_rank0, is_rank0
from .disk_space import check_room, write_problem


class TrainingStopped(RuntimeError):
    """A NaN/Inf under nan_policy=stop, or a save the disk refused: a clear message instead of a corrupted run."""


class CheckpointNotSaved(TrainingStopped):
    """A save that the disk refused (full, read-only): the run stops with the previous checkpoint intact."""


class Checkpointer:
    """The checkpoints of one run in `root` (None: checkpoint.dir unset, nothing is saved). `collective`: every
    rank sees a failed write (DCP gathers the write results); False: a rank's own files (DeepSpeed)."""

    def __init__(self, root: Optional[str], write: Callable[[Path, Dict], Path], health: HealthMonitor,
                 collective: bool, say: Callable[[str], None]):
        self.root = Path(root) if root else None
        self.write, self.health, self.collective, self.say = write, health, collective, say
        self.saved_step: Optional[int] = None  # the step whose checkpoint exists (no second save of a step)
        self.last: Optional[str] = None  # the newest checkpoint saved or resumed: the closing summary names it

    def resumed(self, path: Path, step: int) -> None:
        self.saved_step, self.last = step, str(path)

    def save(self, step: int, train_state: Callable[[], Dict]) -> None:
        """The checkpoint of `step`, unless there is no checkpoint.dir or `step` is saved already."""
        if self.root is None or self.saved_step == step:
            return
        self.saved_step = step
        self._check_room(step)
        try:
            path = self.write(self.root, train_state())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # torch DCP's CheckpointException is a BaseException
            self._disk_problem(exc, step)
            raise
        self.last = str(path)
        self.say(f"saved checkpoint {path}")
        self.health.saved(path.name)

    def _check_room(self, step: int) -> None:
        """Refuse a save that cannot fit (the last checkpoint's size is known) before writing anything. Rank 0
        looks and says; every rank stops."""
        message = None
        if is_rank0():
            kept = _latest_or_none(self.root)
            try:
                problem = check_room(self.root, kept)
            except OSError:  # the last checkpoint changed under us: nothing to estimate from
                problem = None
            if problem:
                message = f"{problem}: step {step} was not saved; {_kept_line(kept)}"
        message = from_rank0(message)
        if message:
            raise CheckpointNotSaved(message)

    def _disk_problem(self, exc: BaseException, step: int) -> None:
        """A save that failed on a full or read-only disk: remove what it wrote, raise one line (else return)."""
        problem = write_problem(exc, self.root)
        if problem is None:
            return
        partial, kept = self.root / f"{iter_name(step)}.tmp", _latest_or_none(self.root)
        removed = []
        if partial.exists():  # land_checkpoint writes only there until the checkpoint is whole
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial.name)
        error = CheckpointNotSaved(f"{problem}: step {step} was not saved"
                                   + (f" (its partial {', '.join(removed)} removed)" if removed else "")
                                   + f"; {_kept_line(kept)}")
        error.every_rank = not self.collective  # a rank-local write failed on this rank alone
        raise error from None


def _latest_or_none(root: Path) -> Optional[Path]:
    """The checkpoint `latest` names, or None (none yet, or a damaged pointer: the resume checks say what is wrong)."""
    try:
        return latest_checkpoint(root)
    except Exception:
        return None


def _kept_line(kept: Optional[Path]) -> str:
    if kept is None:
        return "there is no earlier checkpoint"
    return f"{kept.name} is kept: make room and rerun the same command to resume from it"
