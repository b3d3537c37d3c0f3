"""The engine-independent part of training: the step loop, logging, evaluation cadence, checkpoint
cadence and clean exits on signals / time limits.

Both trainers (Megatron-Core: `rf_megatron.trainer`, DeepSpeed ZeRO: `rf_megatron.zero.trainer`)
subclass `TrainingLoop`, so their JSONL metrics, console lines and stop/resume behaviour are the
same and runs of the two engines compare line by line.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch.distributed as dist

from .signals import ExitSignals


SCHEDULE_OPTIONS = (("optim", "lr"), ("optim", "min_lr"), ("optim", "lr_warmup_steps"), ("optim", "lr_decay_style"),
                    ("optim", "lr_wsd_decay_steps"), ("optim", "weight_decay"), ("train", "train_steps"))


class TrainingStopped(RuntimeError):
    """A NaN/Inf under nan_policy=stop: a clear message instead of a corrupted run."""


class AlreadyFinished(Exception):
    """checkpoint.dir already holds the run's last step: nothing to train (a re-run sweep, a resubmitted job)."""


def stop_if_finished(cfg) -> None:
    """Before anything slow: a run whose latest checkpoint reached train.train_steps ends at once (exit 0) instead
    of loading the model to train nothing and log its final evaluation a second time."""
    from .checkpoint_dir import MANIFEST, CheckpointError, latest_checkpoint, read_train_state, verify_checkpoint

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


class TrainingLoop:
    """Subclasses set `cfg`, `step`, `stream` (a MicrobatchStream), `metrics` (a MetricsLogger) and
    `flops_per_token`, and implement the engine hooks below."""

    # --- engine hooks ---------------------------------------------------------------------------
    def train_step(self) -> Tuple[float, float, bool]:
        """One optimizer step: (global mean loss, grad norm, whether the update was applied)."""
        raise NotImplementedError

    def evaluate(self, dataset) -> Tuple[float, int]:
        """(token-weighted mean loss, tokens scored) over the first `samples` of `dataset` (a held-out set) in
        `batches` global batches (`eval_window(dataset)`), on every rank."""
        raise NotImplementedError

    def lambdas(self) -> Dict[str, float]:
        """Per-layer lambdas of learnable variants (empty otherwise)."""
        raise NotImplementedError

    def save(self) -> None:
        raise NotImplementedError

    def current_lr(self) -> float:
        raise NotImplementedError

    def on_finished(self) -> None:
        """After the last step's evaluation and checkpoint."""

    # --- shared -----------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if dist.get_rank() == 0:
            print(msg, flush=True)

    def find_resume_checkpoint(self) -> Optional[Path]:
        """The checkpoint this run continues (None: a fresh run), after the checks that keep checkpoints from
        being lost or misread (rf_megatron/checkpoint_dir.py). Sets `run_id`, the lineage id this run's
        checkpoints carry (kept across resumes; pruning only ever removes older checkpoints of the same id),
        `skip_batches` (global batches a rewind past a divergence skips) and `health` (checkpoint_health.py)."""
        import dataclasses

        from .checkpoint_dir import (CheckpointError, check_model_unchanged, is_rank0, latest_checkpoint, new_run_id,
                                     newest_verified, prepare_fresh_run, read_train_state)
        from .checkpoint_health import HealthMonitor, batches_to_skip, rewind
        from .config import ConfigError

        ckpt = self.cfg.checkpoint
        self.run_id, self.skip_batches = new_run_id(), 0
        self.health = HealthMonitor(ckpt.dir, self.cfg.train.loss_spike_factor, writer=is_rank0())
        if not ckpt.dir:
            return None
        path = None
        if ckpt.resume and not ckpt.start_over:
            try:
                path = latest_checkpoint(ckpt.dir)
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
        if path is None:
            prepare_fresh_run(ckpt.dir, ckpt.start_over, rank0=is_rank0())
            return None
        if ckpt.rewind_to_healthy:
            path = rewind(ckpt.dir, path, say=_say, rank0=is_rank0())
        path = newest_verified(ckpt.dir, path, say=_say)
        if path is None:
            raise ConfigError(f"no checkpoint in checkpoint.dir={ckpt.dir} matches its checksums (each was moved "
                              "aside, see above): set checkpoint.start_over=true to start again")
        check_model_unchanged(path, dataclasses.asdict(self.cfg.model))
        self.run_id = read_train_state(path).get("run_id")
        self.skip_batches = batches_to_skip(path)
        self.health.pending.append(path.name)  # the next step judges it again
        return path

    def skip_rewound_data(self, consumed: int) -> int:
        """Consumed samples after a rewind's skip (checkpoint.rewind_to_healthy), said once."""
        if not self.skip_batches:
            return consumed
        skipped = self.skip_batches * self.cfg.train.global_batch_size
        self._print(f"skipping {self.skip_batches} global batch(es) ({skipped} samples) that the diverged steps read")
        return consumed + skipped

    def note_schedule_changes(self, checkpoint) -> None:
        """Say which schedule options differ from the checkpoint's run config (the current ones apply)."""
        import yaml

        saved = yaml.safe_load((Path(checkpoint) / "run_config.yaml").read_text()) or {}
        changes = []
        for section, key in SCHEDULE_OPTIONS:
            old, new = (saved.get(section) or {}).get(key), getattr(getattr(self.cfg, section), key)
            if old is not None and old != new:
                changes.append(f"{section}.{key} {old} -> {new}")
        if changes:
            self._print(f"note: the LR schedule follows this run's config, changed since the checkpoint: {', '.join(changes)}")

    def check_finite(self, what: str, value: float, update_applied: bool = False) -> None:
        """Stop on NaN/Inf under nan_policy=stop, and always once a non-finite update was applied
        (fp32 / bf16 optimizers do not skip those: the weights are gone, skipping cannot help). The stop
        message names the newest healthy checkpoint (checkpoint_health.py)."""
        if math.isfinite(value):
            return
        step = self.step + 1
        if update_applied or self.cfg.train.nan_policy == "stop":
            self.health.failed(step, f"{what} {value} at step {step}")
            advice = self.health.stop_advice(step)
        if update_applied:
            raise TrainingStopped(f"{what} is {value} at step {step} and the update was applied, so the "
                                  f"weights are no longer finite: stopping; {advice}")
        if self.cfg.train.nan_policy == "stop":
            raise TrainingStopped(f"{what} is {value} at step {step}: stopping (train.nan_policy=skip skips such "
                                  f"steps instead); {advice}")

    def train(self) -> Dict[str, float]:
        t, ckpt = self.cfg.train, self.cfg.checkpoint
        signals = ExitSignals(max_minutes=t.exit_duration_mins) if t.exit_on_signal or t.exit_duration_mins else None
        tokens_per_step = t.global_batch_size * self.cfg.model.seq_length
        # tokens/s and MFU count the training steps' own time: evaluation, checkpoints and logging are excluded
        window_loss, window_steps, window_seconds = 0.0, 0, 0.0
        result = {}
        try:
            if t.eval_only:
                return {"valid_loss": self._log_eval(), **self._log_test(), "step": self.step}
            while self.step < t.train_steps:
                step_start = time.time()
                loss, grad_norm, applied = self.train_step()  # returns host floats: the step has finished
                window_seconds += time.time() - step_start
                self.step += 1
                problem = self.health.observe(self.step, loss, grad_norm, applied)
                if problem and math.isfinite(loss):  # a spike (non-finite values say so where they happen)
                    self._print(f"warning: {problem}; the checkpoint before it, if any, is marked unhealthy")
                if math.isfinite(loss):
                    window_loss, window_steps = window_loss + loss, window_steps + 1
                if self.step % t.log_interval == 0 or self.step == t.train_steps:
                    self._log_train(loss, grad_norm, window_loss / max(window_steps, 1), window_steps,
                                    window_seconds, tokens_per_step)
                    window_loss, window_steps, window_seconds = 0.0, 0, 0.0
                if t.lambda_log_interval and self.step % t.lambda_log_interval == 0:
                    lambdas = self.lambdas()
                    if lambdas:
                        self.metrics.log(self.step, lambdas)
                if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.train_steps:
                    self._log_eval()
                if ckpt.save_interval and self.step % ckpt.save_interval == 0:
                    self._checkpoint()
                reason = signals.should_exit() if signals else ""
                if not reason and t.exit_interval and self.step % t.exit_interval == 0:
                    reason = f"exit_interval={t.exit_interval}"
                if reason and self.step < t.train_steps:
                    if ckpt.dir:
                        self._print(f"{reason}: saving at step {self.step} and exiting")
                        self._checkpoint()
                    else:
                        self._print(f"{reason}: exiting at step {self.step} WITHOUT a checkpoint (checkpoint.dir is "
                                    "not set): a rerun starts from step 0")
                    return {"step": self.step, "stopped": reason, "saved": bool(ckpt.dir)}
            result["valid_loss"] = self._log_eval()
            result.update(self._log_test())
            self._checkpoint()
            self.on_finished()
            result["step"] = self.step
            return result
        finally:
            if signals:
                signals.restore()
            self.metrics.close()

    def _checkpoint(self) -> None:
        """save(), and the new checkpoint waits for the next step's verdict on its health."""
        before = self._saved_step
        self.save()
        if self.cfg.checkpoint.dir and self._saved_step == self.step != before:
            self.health.saved(f"iter_{self.step:07d}")

    def _log_train(self, loss, grad_norm, mean_loss, steps, seconds, tokens_per_step):
        tokens_per_s = steps * tokens_per_step / max(seconds, 1e-9)
        tflops = tokens_per_s * self.flops_per_token / dist.get_world_size() / 1e12
        lr = self.current_lr()
        if not hasattr(self, "_peak_tflops"):
            from .device_peak import peak_tflops

            self._peak_tflops = peak_tflops(self.cfg.logging.peak_tflops, fp8=bool(self.cfg.parallel.fp8))
        mfu = tflops / self._peak_tflops if self._peak_tflops else None
        metrics = {"loss": mean_loss, "last_loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
                   "mfu": mfu, "consumed_samples": self.stream.consumed_samples, **_peak_memory()}
        self.metrics.log(self.step, metrics, console=(
            f"step {self.step:>6}/{self.cfg.train.train_steps} | loss {mean_loss:.4f} | lr {lr:.3e} | "
            f"grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | {tflops:.3f} TFLOP/s/device | "
            f"MFU {f'{100 * mfu:.2f}%' if mfu is not None else 'n/a'}"))

    def eval_window(self, dataset) -> Tuple[int, int]:
        """(global batches, samples) one evaluation of a held-out set scores: its first eval_steps global batches,
        or all of it (train.eval_full); never a sample twice (a last partial batch is padded, masked out)."""
        t = self.cfg.train
        samples = len(dataset) if t.eval_full else min(t.eval_steps * t.global_batch_size, len(dataset))
        return -(-samples // t.global_batch_size), samples

    def _log_eval(self, name: str = "valid") -> float:
        """Score the validation (or test) set; log `<name>_loss`, `<name>_ppl` and `<name>_tokens`."""
        dataset = getattr(self, f"{name}_ds", None)
        if dataset is None:  # data.split without that part, and no data.<name>_paths
            return float("nan")
        loss, tokens = self.evaluate(dataset)
        ppl = math.exp(min(loss, 50))
        what = {"valid": "validation", "test": "test"}[name]
        self.metrics.log(self.step, {f"{name}_loss": loss, f"{name}_ppl": ppl, f"{name}_tokens": tokens},
                         console=f"step {self.step:>6} | {what} loss {loss:.4f} | ppl {ppl:.2f} | {tokens:,} tokens")
        return loss

    def _log_test(self) -> Dict[str, float]:
        """The test set, scored once at the end (Megatron-LM's do_test)."""
        return {"test_loss": self._log_eval("test")} if getattr(self, "test_ds", None) is not None else {}


def _peak_memory() -> Dict[str, float]:
    """Peak GPU memory of this process so far (GiB), on GPU only."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def _say(msg: str) -> None:
    """Print on rank 0 (also before a process group exists)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr if msg.startswith("warning:") else sys.stdout, flush=True)


def run_entry_point(build: Callable[[], "TrainingLoop"]) -> int:
    """What both pretrain/ scripts do: build the trainer (a ConfigError -> one `error:` line, exit 2),
    train, shut down; say how to resume when the run stopped early."""
    from . import child_lifetime
    from .child_lifetime import exit_now
    from .config import ConfigError
    from .quiet import silence_known_warnings

    silence_known_warnings()
    child_lifetime.install()  # helper processes (checkpoint writers) never outlive the trainer
    try:
        trainer = build()
    except AlreadyFinished as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(exc), flush=True)
        return 0
    except ConfigError as exc:
        # Config errors are the same on every rank: rank 0 says it. A damaged checkpoint file may fail on
        # one rank only (the one reading it), while the others wait in a collective: that rank says it.
        if int(os.environ.get("RANK", "0")) == 0 or getattr(exc, "every_rank", False):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        result = trainer.train()
    except TrainingStopped as exc:  # every rank sees the same (global) loss / grad norm and stops here
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        exit_now(1)
    except BaseException:
        # Report now: the other ranks may be blocked in a collective that this rank left, and a
        # clean shutdown (a barrier) would hang; the launcher tears the job down on our exit code.
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        exit_now(1)
    trainer.close()
    if "stopped" in result and result.get("saved") and int(os.environ.get("RANK", "0")) == 0:
        # under SLURM the job script says what comes next (slurm/pretrain.sbatch: requeue, or resubmit)
        how = "checkpoint saved" if os.environ.get("SLURM_JOB_ID") else "rerun the same command to resume"
        print(f"stopped at step {result['step']} ({result['stopped']}); {how}", flush=True)
    return 0
