"""What a run continues from, checked before anything is loaded: a finished run ends at once; the checkpoint to
resume is the newest one that verifies (damaged ones moved aside, a rewind past a divergence on request) of the
same model and lineage; the rewind's data skip and the schedule options changed since the checkpoint are said."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import yaml

from . import run_lock
from .checkpoint_dir import (HEALTH, MANIFEST, CheckpointError, check_model_unchanged, is_rank0, latest_checkpoint,
                             new_run_id, newest_verified, prepare_fresh_run, read_train_state, verify_checkpoint)
from .checkpoint_health import HealthMonitor, batches_to_skip, read_health, rewind
from .console import from_rank0, say
from .disk_space import write_problem
from .errors import ConfigError

SCHEDULE_OPTIONS = (("optim", "lr"), ("optim", "min_lr"), ("optim", "lr_warmup_steps"), ("optim", "lr_decay_style"),
                    ("optim", "lr_wsd_decay_steps"), ("optim", "weight_decay"), ("train", "train_steps"))


class AlreadyFinished(Exception):
    """checkpoint.dir already holds the run's last step: nothing to train (a re-run sweep, a resubmitted job)."""


def stop_if_finished(cfg) -> None:
    """Before anything slow: a run whose latest checkpoint reached train.train_steps ends at once (exit 0) instead
    of loading the model to train nothing and log its final evaluation a second time."""
    ckpt = cfg.checkpoint
    if not ckpt.dir or not ckpt.resume or ckpt.start_over or cfg.train.eval_only:
        return
    try:
        path = latest_checkpoint(ckpt.dir)
        step = read_train_state(path)["step"] if path else None
    except (CheckpointError, OSError, ValueError, KeyError):
        return  # the trainer's own checks say what is wrong
    if step is None or step < cfg.train.train_steps:
        return
    if (path / MANIFEST).is_file() and verify_checkpoint(path) is None:  # a damaged one: the trainer falls back
        raise AlreadyFinished(f"{cfg.name}: already finished ({path} is step {step}, train.train_steps="
                              f"{cfg.train.train_steps}): nothing to do (raise train.train_steps to train on, or "
                              "checkpoint.start_over=true to train again)")


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What a run continues from, decided before the datasets are built (a rewind changes how many samples they
    need) and before anything is loaded."""

    path: Optional[Path]  # the checkpoint to load; None: a fresh run
    run_id: str  # the lineage id this run's checkpoints carry (kept across resumes; pruning keeps to it)
    skip_batches: int = 0  # global batches a rewind past a divergence skips (checkpoint.rewind_to_healthy)


class ResumeChecks:
    """TrainingLoop's resume checks (it sets `cfg`, `_print` and `check_resumable`)."""

    def find_resume_checkpoint(self) -> ResumePlan:
        """The plan of this run's start, after the checks that keep checkpoints from being lost or misread
        (rf_megatron/checkpoint_dir.py); takes the directory's run lock. Sets `health` (checkpoint_health.py),
        which the next step's verdict on the resumed checkpoint goes to."""
        ckpt = self.cfg.checkpoint
        self.health = HealthMonitor(ckpt.dir, self.cfg.train.loss_spike_factor, writer=is_rank0())
        fresh = ResumePlan(None, new_run_id())
        if not ckpt.dir:
            return fresh
        hold_checkpoint_dir(ckpt.dir)
        path = None
        if ckpt.resume and not ckpt.start_over:
            try:
                path = latest_checkpoint(ckpt.dir)
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
        if path is None:
            prepare_fresh_run(ckpt.dir, ckpt.start_over, rank0=is_rank0())
            return fresh
        if ckpt.rewind_to_healthy:
            path = rewind(ckpt.dir, path, say=say, rank0=is_rank0())
        elif read_health(ckpt.dir).get(path.name, {}).get("healthy") is False:
            say(f"warning: {path} is marked unhealthy ({Path(ckpt.dir) / HEALTH}: the steps after it "
                 "diverged); resuming it anyway: checkpoint.rewind_to_healthy=true resumes the newest healthy one "
                 "and skips the data of the diverging steps")
        path = newest_verified(ckpt.dir, path, say=say)
        if path is None:
            raise ConfigError(f"no checkpoint in checkpoint.dir={ckpt.dir} matches its checksums (each was moved "
                              "aside, see above): set checkpoint.start_over=true to start again")
        check_model_unchanged(path, dataclasses.asdict(self.cfg.model))
        saved = read_train_state(path)
        self.check_resumable(path, saved)
        self.health.pending.append(path.name)  # the next step judges it again
        return ResumePlan(path, saved.get("run_id"), batches_to_skip(path))

    def skip_rewound_data(self, consumed: int, skip_batches: int) -> int:
        """Consumed samples after a rewind's skip (checkpoint.rewind_to_healthy), said once."""
        if not skip_batches:
            return consumed
        skipped = skip_batches * self.cfg.train.global_batch_size
        self._print(f"skipping {skip_batches} global batch(es) ({skipped} samples) that the diverged steps read")
        return consumed + skipped

    def note_changes(self, checkpoint) -> None:
        """Say what differs from the checkpoint's run config and shapes the rest of the run (the current values
        apply): the LR schedule, the global batch, the TP x PP layout."""
        saved = yaml.safe_load((Path(checkpoint) / "run_config.yaml").read_text()) or {}
        changes = []
        for section, key in SCHEDULE_OPTIONS:
            old, new = (saved.get(section) or {}).get(key), getattr(getattr(self.cfg, section), key)
            if old is not None and old != new:
                changes.append(f"{section}.{key} {old} -> {new}")
        if changes:
            self._print(f"note: the LR schedule follows this run's config, changed since the checkpoint: {', '.join(changes)}")
        old_batch, batch = (saved.get("train") or {}).get("global_batch_size"), self.cfg.train.global_batch_size
        if old_batch is not None and old_batch != batch:
            self._print(f"note: train.global_batch_size {old_batch} -> {batch}: each step from here reads {batch} "
                        "samples")
        was, now = saved.get("parallel") or {}, self.cfg.parallel
        old_layout = f"TP{was.get('tensor_parallel', 1)} x PP{was.get('pipeline_parallel', 1)}"
        new_layout = f"TP{now.tensor_parallel} x PP{now.pipeline_parallel}"
        if was and old_layout != new_layout:
            self._print(f"note: the checkpoint was saved as {old_layout} and loads into {new_layout} (resharded)")


def hold_checkpoint_dir(root) -> None:
    """Rank 0 takes the directory's run lock (rf_megatron/run_lock.py); every rank raises the same one-line
    ConfigError when another live run holds it."""
    problem = None
    if is_rank0():
        try:
            run_lock.acquire(root, say=say)
        except run_lock.DirectoryInUse as exc:
            problem = str(exc)
        except OSError as exc:  # a read-only or full checkpoint.dir
            problem = write_problem(exc, root) or f"cannot write checkpoint.dir={root}: {exc.strerror or exc}"
    problem = from_rank0(problem)
    if problem:
        raise ConfigError(problem)


