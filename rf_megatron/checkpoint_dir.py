"""What a checkpoint directory holds, for both engines: `iter_NNNNNNN/` checkpoints (each with a
`train_state.json` and the run's `run_config.yaml`), a `latest` pointer, and the rules that keep
them from being lost:

- a fresh run never writes into a directory that holds another run's checkpoints (it refuses, or with
  `checkpoint.start_over=true` moves them aside into `previous-<time>/`; nothing is deleted);
- every checkpoint carries its run's lineage id (`run_id`, kept across resumes), and pruning removes
  only checkpoints of the same lineage that are older than the one just committed;
- a resumed run may not change the model: any option that alters the parameters or the math is refused;
- every checkpoint carries `manifest.json` (size and sha256 of every file, written last, hashed in parallel
  by all ranks); a resume verifies it and falls back to the newest checkpoint that verifies, moving the
  damaged one aside (`corrupt-iter_N-<time>/`), and the HF exporter refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .config import ConfigError
from .console import from_rank0, is_rank0  # noqa: F401  (is_rank0: re-exported)

LATEST = "latest"
MANIFEST = "manifest.json"
HEALTH = "health.json"  # verdicts on the checkpoints' weights (checkpoint_health.py)
# Model options a resumed run may change: they alter neither the parameters nor the math of a step.
MODEL_OPTIONS_FREE_ON_RESUME = ("seq_length", "init_method_std", "attention_backend", "make_vocab_size_divisible_by")


class CheckpointError(RuntimeError):
    pass


def point_latest(root: Path, name: str) -> None:
    """Rewrite `latest` atomically (write + rename)."""
    pointer = Path(root) / f"{LATEST}.tmp"
    pointer.write_text(name)
    pointer.replace(Path(root) / LATEST)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def iter_name(step: int) -> str:
    """The directory name of step `step`'s checkpoint (Megatron-LM's `iter_NNNNNNN`)."""
    return f"iter_{step:07d}"


def resolve_iteration(path) -> Path:
    """A checkpoint root (following `latest`) or an `iter_N` directory -> the iteration directory. Raises
    CheckpointError in one line; what the caller needs inside the directory is the caller's to check."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if (path / LATEST).exists():
        name = (path / LATEST).read_text(errors="replace").strip()
        if not (path / name).is_dir():
            raise CheckpointError(f"incomplete checkpoint: {path}/{LATEST} names {name}, which does not exist")
        return path / name
    if path.name.startswith("iter_") or (path / "train_state.json").exists() or (path / "run_config.yaml").exists():
        return path  # an iteration directory (by name, or by what it holds)
    raise CheckpointError(f"checkpoint {path}: neither a checkpoint root (no '{LATEST}' file) nor an iter_N directory")


def step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1].split(".", 1)[0])


def read_train_state(path: Path) -> Dict:
    return json.loads((Path(path) / "train_state.json").read_text())


def complete_checkpoints(root) -> List[Path]:
    """The finished `iter_*` directories under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")
            and (p / "train_state.json").exists()]
    return sorted(done, key=step_of)


def latest_checkpoint(root) -> Optional[Path]:
    """The last complete checkpoint under `root`, or None."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not name.startswith("iter_") or "/" in name or not name[5:].isdigit():
        raise CheckpointError(f"{pointer} does not name a checkpoint ({name[:40]!r}){other_checkpoint_hint(root)}")
    path = Path(root) / name
    if not (path / "train_state.json").exists():
        raise CheckpointError(f"{pointer} names {name}, which is incomplete or missing"
                              f"{other_checkpoint_hint(root, besides=path)}")
    return path


def other_checkpoint_hint(root, besides: Optional[Path] = None) -> str:
    """'; the newest other complete checkpoint is X: to resume from it, echo X > latest' (or '')."""
    others = [p for p in complete_checkpoints(root) if besides is None or p.name != besides.name]
    if not others:
        return ""
    name = others[-1].name
    return f"; the newest other complete checkpoint is {name}: to resume from it, echo {name} > {Path(root) / LATEST}"


def prepare_fresh_run(root, start_over: bool, rank0: bool) -> None:
    """Before a run that does not resume: refuse a directory holding checkpoints, or (start_over) move
    them aside. Every rank checks (same shared filesystem, same answer); only rank 0 moves."""
    root = Path(root)
    old = complete_checkpoints(root)
    if not old and not (root / LATEST).exists():
        return
    names = ", ".join(p.name for p in old[-3:]) or LATEST
    if not start_over:
        elsewhere = ("point checkpoint.dir elsewhere, or set checkpoint.start_over=true to move them aside "
                     "(nothing is deleted)")
        if (root / LATEST).exists():  # this run was told not to resume
            raise ConfigError(f"checkpoint.dir={root} holds checkpoints of an earlier run ({names}) that this run "
                              f"would not resume (checkpoint.resume=false): resume them (checkpoint.resume=true), "
                              f"{elsewhere}")
        raise ConfigError(f"checkpoint.dir={root} holds checkpoints ({names}) but no {LATEST} pointer names one (a "
                          f"deleted {LATEST}, or a run killed during its first save): to resume the newest, echo "
                          f"{old[-1].name} > {root / LATEST}; or {elsewhere}")
    if rank0:
        aside = root / time.strftime("previous-%Y%m%d-%H%M%S")
        aside.mkdir()
        for item in [*root.glob("iter_*"), root / LATEST, root / HEALTH]:
            if item.exists():
                item.rename(aside / item.name)
        print(f"checkpoint.start_over: moved the earlier checkpoints in {root} to {aside}", flush=True)


def check_model_unchanged(checkpoint: Path, model_now: Dict) -> None:
    """Refuse resuming with a model section that changes the parameters or the math, in one line."""
    import yaml

    config = Path(checkpoint) / "run_config.yaml"
    if not config.exists():  # written by hand or by a tool: nothing to compare
        return
    saved = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    changed = [f"model.{key} {saved[key]!r} -> {value!r}" for key, value in model_now.items()
               if key in saved and saved[key] != value and key not in MODEL_OPTIONS_FREE_ON_RESUME]
    if changed:
        raise ConfigError(f"{checkpoint} was trained with another model: {', '.join(changed)}; resume with the "
                          "checkpoint's model options, or start a new run in another checkpoint.dir")


def read_health(root) -> Dict[str, Dict]:
    """health.json: the verdicts on the checkpoints' weights (written by checkpoint_health.HealthMonitor)."""
    try:
        return json.loads((Path(root) / HEALTH).read_text())
    except (OSError, ValueError):
        return {}


def newest_healthy(root) -> Optional[Path]:
    records = read_health(root)
    healthy = [p for p in complete_checkpoints(root) if records.get(p.name, {}).get("healthy") is True]
    return healthy[-1] if healthy else None


def land_checkpoint(root, step: int, write_shards: Callable[[Path], None], run_config_yaml: str,
                    train_state: Dict, keep_last: int) -> Path:
    """The one commit protocol of both engines (call on every rank): nothing a reader trusts exists until the
    checkpoint is whole, so a crash or kill at any point resumes from the previous `latest`.
    1. rank 0 removes what crashed saves left (`iter_*.tmp`) and makes `iter_N.tmp`;
    2. every rank writes its share into it: `write_shards(tmp)` (Megatron's DCP shards, DeepSpeed's files);
    3. rank 0 adds run_config.yaml and train_state.json; every rank hashes its share of the files;
    4. rank 0 writes the manifest, renames `iter_N.tmp` to `iter_N` (replacing an older copy of that step) and
       points `latest` at it (commit).
    A disk error in rank 0's steps is raised on every rank (`_on_rank0`). Returns the checkpoint's path."""
    root, name = Path(root), iter_name(step)
    final, tmp = root / name, root / f"{name}.tmp"

    def make_tmp() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=stale != tmp)  # ours must go: its old files would mix in
        tmp.mkdir()

    def write_records() -> None:
        (tmp / "run_config.yaml").write_text(run_config_yaml)
        (tmp / "train_state.json").write_text(json.dumps({**train_state, "step": step}))

    def publish(files: Dict) -> None:
        _write_manifest_file(tmp, files)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        commit(root, name, keep_last)

    _on_rank0(make_tmp)
    write_shards(tmp)
    barrier()
    _on_rank0(write_records)
    files = _hash_shares(tmp)
    _on_rank0(lambda: publish(files))
    return final


def _on_rank0(action: Callable[[], None]) -> None:
    """`action` on rank 0; an OSError it raises is raised on every rank (the others would otherwise wait at the next
    collective until the job's timeout). Every rank leaves together."""
    error = None
    if is_rank0():
        try:
            action()
        except OSError as exc:
            error = exc
    error = from_rank0(error)
    if error is None:
        barrier()
    else:
        raise error


def barrier() -> None:
    """Every rank waits for the others (a no-op without a process group: one process, the tools)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def commit(root: Path, name: str, keep_last: int) -> None:
    """Point `latest` at the finished checkpoint `name` (write + rename) and drop older ones of the
    same lineage (rank 0)."""
    point_latest(root, name)
    _fsync_dir(root)
    prune(root, root / name, keep_last)


def prune(root: Path, committed: Path, keep_last: int) -> None:
    """Keep the `keep_last` newest checkpoints of `committed`'s lineage up to it; never touch another
    lineage's checkpoints, newer ones, or the newest one known healthy (a divergence can rewind to it)."""
    if keep_last <= 0:
        return
    run_id, step = read_train_state(committed).get("run_id"), step_of(committed)
    ours = [p for p in complete_checkpoints(root)
            if step_of(p) < step and _run_id_of(p) == run_id]
    healthy = newest_healthy(root)
    for old in ours[:max(len(ours) - (keep_last - 1), 0)]:
        if old != healthy:
            shutil.rmtree(old, ignore_errors=True)


def _run_id_of(path: Path) -> Optional[str]:
    try:
        return read_train_state(path).get("run_id")
    except (OSError, ValueError):
        return "unreadable"  # never ours: not pruned


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- checksums ---------------------------------------------------------------------------------------
def checkpoint_files(path: Path) -> List[str]:
    """Every file of a checkpoint directory (relative paths), except the manifest itself."""
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _my_share(names: List[str]) -> List[str]:
    """This rank's share of the files (all of them without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return names
    return names[dist.get_rank()::dist.get_world_size()]


def _gather(part: Dict) -> Dict:
    import torch.distributed as dist

    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def write_manifest(path: Path) -> None:
    """Hash the checkpoint's files (every rank its share) and write manifest.json (rank 0, last). Call on
    every rank once all files are written."""
    files = _hash_shares(Path(path))
    if is_rank0():
        _write_manifest_file(Path(path), files)


def _hash_shares(path: Path) -> Dict:
    """{file: size and sha256} of every file under `path`: each rank hashes its share, every rank gets all."""
    mine = {name: {"bytes": (path / name).stat().st_size, "sha256": file_digest(path / name)}
            for name in _my_share(checkpoint_files(path))}
    return _gather(mine)


def _write_manifest_file(path: Path, files: Dict) -> None:
    tmp = path / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1))
    tmp.replace(path / MANIFEST)


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if every file matches the manifest (or there is no manifest: an older checkpoint), else one
    line naming the first file that does not. Every rank checks its share; all ranks get the answer."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path / MANIFEST} is unreadable"
    problems = {}
    for name in _my_share(sorted(manifest)):
        file, want = path / name, manifest[name]
        if not file.is_file():
            problems[name] = f"{file} is missing"
        elif file.stat().st_size != want["bytes"]:
            problems[name] = f"{file} has {file.stat().st_size} bytes, the manifest says {want['bytes']}"
        elif file_digest(file) != want["sha256"]:
            problems[name] = f"{file} does not match its checksum"
    problems = _gather(problems)
    return problems[min(problems)] if problems else None


def newest_verified(root, start: Path, say) -> Optional[Path]:
    """`start` if it verifies; else move it aside, say so, and try the next older complete checkpoint.
    Returns None when none verifies. Rank 0 moves directories and rewrites `latest`."""
    rank0 = is_rank0()
    candidates = [p for p in complete_checkpoints(root) if step_of(p) <= step_of(start)][::-1]
    for i, path in enumerate(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            if i and rank0:
                point_latest(root, path.name)
            return path
        aside = Path(root) / f"corrupt-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        say(f"warning: {problem}: {path.name} is damaged, moved to {aside.name}; "
            + (f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else "no older checkpoint"))
        barrier()
        if rank0:
            path.rename(aside)
        barrier()
    return None
