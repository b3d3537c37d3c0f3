"""A full or read-only disk is one line, not a traceback per rank.

A checkpoint save or a conversion that runs out of space (or meets a read-only or foreign-owned folder) fails deep
inside torch's writers, as an `OSError`, a DCP `CheckpointException` per rank, or a `RuntimeError` of torch's zip
writer ("unexpected pos ..."). `write_problem` recognises those and says what happened in one line: the path, its
free space, and what is kept. A save whose previous checkpoint's size does not fit in the free space is refused
before it writes anything (`check_room`).
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for the file system"}
TEXT_SIGNS = (("No space left", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT),
              ("Read-only file system", errno.EROFS), ("Permission denied", errno.EACCES),
              ("unexpected pos", errno.ENOSPC), ("PytorchStreamWriter failed", errno.ENOSPC))
ROOM_MARGIN = 1.05  # a checkpoint may grow a little (optimizer state appears after the first step, metadata)


def free_bytes(path) -> Optional[int]:
    """Free space of the file system holding `path` (its nearest existing ancestor), or None."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def size_of(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def human(n: Optional[int]) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _errno_of(exc: BaseException) -> Optional[int]:
    """The disk errno behind `exc`, following causes, contexts and DCP's per-rank failures."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e.errno
        for _, failure in sorted((getattr(e, "failures", None) or {}).items()):  # DCP's CheckpointException
            todo.append(failure if isinstance(failure, BaseException) else getattr(failure, "exception", None))
        todo += [e.__cause__, e.__context__]
        for sign, code in TEXT_SIGNS:
            if sign in str(e):
                return code
    return None


def write_problem(exc: BaseException, path) -> Optional[str]:
    """One line for a write that failed because of the disk (None: another kind of failure)."""
    code = _errno_of(exc)
    if code is None:
        return None
    return f"cannot write {path}: {DISK_ERRNOS[code]} ({human(free_bytes(path))} free)"


def check_room(root, previous) -> Optional[str]:
    """None if the folder `root` has room for another checkpoint the size of `previous` (a checkpoint folder, or
    None when there is none yet: nothing to estimate from), else one line saying why not."""
    if previous is None or not Path(previous).is_dir():
        return None
    need, free = size_of(previous) * ROOM_MARGIN, free_bytes(root)
    if free is None or free >= need:
        return None
    return (f"checkpoint.dir={root} has {human(free)} free, and the last checkpoint ({Path(previous).name}) "
            f"took {human(size_of(previous))}")


def conversion_problem(exc: BaseException, output) -> Optional[str]:
    """One line for a converter whose output folder's disk failed it (None: another kind of failure). The
    converters write into a temp folder next to `output` and remove it on any failure (rf_megatron/hf/folder.py)."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    output = Path(output).absolute()
    problem = write_problem(exc, output.parent)
    if problem is None:
        return None
    kept = f"; the existing {output.name} is kept" if output.exists() else ""
    return f"{problem}: nothing was written to {output} (the partial folder was removed{kept})"
