"""The engine-independent part of training (`TrainingLoop`): resume checks and bookkeeping, the step loop,
logging, evaluation, checkpoint cadence and save bookkeeping, and clean exits on signals / time limits.

Both trainers (Megatron-Core: `rf_megatron.engines.megatron`, DeepSpeed ZeRO: `rf_megatron.engines.deepspeed`)
subclass `TrainingLoop`, so their JSONL metrics, console lines and stop/resume behaviour are the
same and runs of the two engines compare line by line.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import yaml

from . import run_lock
from .checkpointer import Checkpointer, TrainingStopped  # noqa: F401  (TrainingStopped: re-exported)
from .data import MicrobatchStream, build_run_datasets, held_out_is_weighted
from .device_peak import peak_tflops
from .flops import parameter_counts, training_flops_per_token
from .metrics import MetricsLogger
from .resume import ResumeChecks, ResumePlan
from .run_config import save_yaml, to_dict
from .run_summary import count, eval_scope, progress, summary
from .signals import ExitSignals


def token_weighted_mean(stats) -> float:
    """(sum of token losses, token count) of this rank, summed over all ranks -> the mean loss per token, the same
    on every rank (microbatches and ranks weighted by their tokens, not averaged)."""
    dist.all_reduce(stats)
    return (stats[0] / stats[1].clamp(min=1)).item()


class TrainingLoop(ResumeChecks):
    """The trainer skeleton. It owns the run's life: the finished-run check, finding and checking the checkpoint
    to resume, the resume bookkeeping (step, data position, rewinds, schedule notes), the training stream, the
    metrics, evaluation, the checkpoint cadence and save bookkeeping, logging and the run label.

    The engine contract, in this order in an engine's `__init__`:
    1. `super().__init__(cfg)`; set `device`, `tokenizer`, and `optimizer`, `scheduler` (what `current_lr` and the
       schedule read);
    2. `plan = self.find_resume_checkpoint()` (a `ResumePlan`; the run lock is held from here);
    3. `self.resume(plan, log_writer)`: builds the datasets (`plan.skip_batches` more training batches: a rewind
       skips them), loads `plan.path` (through `load`) and starts the stream and the metrics;
    and implement the engine hooks below."""

    ENGINE = ""  # train_state.json's "engine" of this trainer's checkpoints
    COLLECTIVE_SAVE = True  # every rank sees a failed save (DCP gathers the write results); False: rank-local

    def __init__(self, cfg) -> None:  # the entry point has said whether the run is finished (stop_if_finished)
        self.cfg = cfg
        self.started = time.time()  # the summary's wall time: start-up included
        self.last_train_loss: Optional[Tuple[float, int, int]] = None  # a logged window's mean, its first and last step
        self.last_eval: Optional[Tuple[float, int, bool]] = None  # validation (loss, tokens, whole set)
        # set by the engine (the contract above): where tensors live, the tokenizer, the optimizer and its schedule
        self.device: Optional[torch.device] = None
        self.tokenizer = self.optimizer = self.scheduler = None
        self.train_ds = self.valid_ds = self.test_ds = None  # resume() builds them

    # --- engine hooks ---------------------------------------------------------------------------
    def train_step(self) -> Tuple[float, float, bool]:
        """One optimizer step: (global mean loss, grad norm, whether the update was applied)."""
        raise NotImplementedError

    def add_eval_terms(self, global_batch, stats) -> None:
        """Add one global batch's (loss sum, token count) on this rank to `stats` (float64, on the device)."""
        raise NotImplementedError

    def counts_eval_terms(self) -> bool:
        """Whether this rank's eval terms count in the all-reduce (a replica of another rank's does not)."""
        return True

    def set_training(self, training: bool) -> None:
        """Train / eval mode of the model (dropout)."""
        raise NotImplementedError

    def data_parallel(self) -> Dict[str, int]:
        """MicrobatchStream's dp_rank / dp_size for this engine (default: Megatron's data-parallel group)."""
        return {}

    def lambdas(self) -> Dict[str, float]:
        """Per-layer lambdas of learnable variants (empty otherwise)."""
        raise NotImplementedError

    def check_resumable(self, path: Path, train_state: Dict) -> None:
        """Raise ConfigError if this engine and config cannot resume the checkpoint at `path`."""

    def load(self, path: Path) -> Dict:
        """Load the checkpoint at `path` into the model, optimizer and scheduler; returns its train state."""
        raise NotImplementedError

    def engine_state(self) -> Dict:
        """This engine's entries of train_state.json (what `check_resumable` compares on resume)."""
        return {}

    def write_checkpoint(self, root: Path, train_state: Dict) -> Path:
        """Write (atomically: temp dir, manifest, `latest`) the checkpoint of this step; returns its path."""
        raise NotImplementedError

    def on_finished(self) -> None:
        """After the last step's evaluation and checkpoint."""

    # --- the skeleton -------------------------------------------------------------------------------
    def resume(self, plan: ResumePlan, log_writer: bool) -> None:
        """Continue as `plan` says (its path None: a fresh run): the datasets, the step, the data position (after a
        rewind's skip), the training stream, the run's config.yaml and metrics."""
        t, path = self.cfg.train, plan.path
        self.run_id = plan.run_id
        self.train_ds, self.valid_ds, self.test_ds = build_run_datasets(self.cfg, self.tokenizer, plan.skip_batches)
        if dist.get_rank() == 0:
            save_yaml(self.cfg, os.path.join(self.cfg.logging.dir, "config.yaml"))
        self._print(f"writing to {self.cfg.logging.dir} (metrics.jsonl, config.yaml), checkpoints "
                    + (f"to {self.cfg.checkpoint.dir}" if self.cfg.checkpoint.dir else "off (checkpoint.dir=null)"))
        self.checkpointer = Checkpointer(self.cfg.checkpoint.dir, self.write_checkpoint, self.health,
                                         self.COLLECTIVE_SAVE, self._print)
        self.step, consumed = 0, 0
        if path is not None:
            state = self.load(path)
            self.step, consumed = state["step"], state["consumed_samples"]
            self.checkpointer.resumed(path, self.step)
            self._print(f"resumed from {path} at step {self.step} ({consumed} samples consumed)"
                        + ("; weights only (an HF import): a fresh optimizer and LR schedule"
                           if state.get("weights_only") else ""))
            if not (state.get("weights_only") or t.eval_only):  # a fresh schedule (an HF import), or none
                self.note_changes(path)
            consumed = self.skip_rewound_data(consumed, plan.skip_batches)
        elif t.eval_only:
            where = f"in {self.cfg.checkpoint.dir}" if self.cfg.checkpoint.dir else "(checkpoint.dir=null)"
            self._print(f"note: train.eval_only: no checkpoint {where} to resume: scoring the initialisation")
        self.stream = MicrobatchStream(self.train_ds, t.global_batch_size, t.micro_batch_size, consumed,
                                       **self.data_parallel())
        self.metrics = MetricsLogger(self.cfg.logging.dir, self.cfg.name, to_dict(self.cfg), log_writer,
                                     self.cfg.logging.wandb_project, self.cfg.logging.tensorboard,
                                     resume_step=self.checkpointer.saved_step)
        self.flops_per_token = training_flops_per_token(self.cfg.model)

    def run_label(self) -> str:
        """`name: variant (lambda mode), N params`: how the console introduces the run."""
        m = self.cfg.model
        return (f"{self.cfg.name}: {m.variant} ({m.lambda_mode if m.variant == 'resformer' else '-'}), "
                f"{parameter_counts(m).total / 1e6:.2f}M params")

    def evaluate(self, dataset, final: bool = False) -> Tuple[float, int]:
        """(token-weighted mean loss, tokens scored) over the window `eval_window(dataset, final)` of a held-out
        set, the same on every rank."""
        t = self.cfg.train
        batches, samples = self.eval_window(dataset, final)
        stream = MicrobatchStream(dataset, t.global_batch_size, t.micro_batch_size, limit=samples,
                                  **self.data_parallel())
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.set_training(False)
        with torch.no_grad():
            for _ in range(batches):
                self.add_eval_terms(stream.next_global_batch(), stats)
        self.set_training(True)
        if not self.counts_eval_terms():
            stats.zero_()
        return token_weighted_mean(stats), int(stats[1].item())

    def train_state(self) -> Dict:
        """train_state.json of a checkpoint of this step."""
        return {"engine": self.ENGINE, "run_id": self.run_id, "step": self.step,
                "consumed_samples": self.stream.consumed_samples, **self.engine_state(),
                "health": self.health.window_record()}

    def checkpoint(self) -> None:
        """The checkpoint of this step (once per step) in checkpoint.dir, if set (rf_megatron/checkpointer.py)."""
        self.checkpointer.save(self.step, self.train_state)

    def closing_summary(self, result: Dict) -> str:
        """The lines a run ends with (rf_megatron/run_summary.py), from what this process saw."""
        outcome = {"step": self.step, "tokens": self.stream.consumed_samples * self.cfg.model.seq_length,
                   "train_loss": self.last_train_loss, "checkpoint": self.checkpointer.last,
                   "stopped": result.get("stopped")}
        if self.last_eval is not None:
            outcome.update(zip(("valid_loss", "valid_tokens", "valid_whole"), self.last_eval))
        return summary(self.cfg, self.ENGINE, outcome, time.time() - self.started)

    @property
    def run_config_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self.cfg), sort_keys=False)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def close(self) -> None:
        run_lock.release()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def _print(self, msg: str) -> None:
        if dist.get_rank() == 0:
            print(msg, flush=True)

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
        self._loop_start, self._first_step = time.time(), self.step  # the step lines' elapsed time and ETA
        try:
            if t.eval_only:
                return {"valid_loss": self._log_eval(final=True), **self._log_test(), "step": self.step}
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
                    self.checkpoint()
                reason = signals.should_exit() if signals else ""
                if not reason and t.exit_interval and self.step % t.exit_interval == 0:
                    reason = f"exit_interval={t.exit_interval}"
                if reason and self.step < t.train_steps:
                    if ckpt.dir:
                        self._print(f"{reason}: saving at step {self.step} and exiting")
                        self.checkpoint()
                    else:
                        self._print(f"{reason}: exiting at step {self.step} WITHOUT a checkpoint (checkpoint.dir is "
                                    "not set): a rerun starts from step 0")
                    return {"step": self.step, "stopped": reason, "saved": bool(ckpt.dir)}
            result["valid_loss"] = self._log_eval(final=True)
            result.update(self._log_test())
            self.checkpoint()
            self.on_finished()
            result["step"] = self.step
            return result
        finally:
            if signals:
                signals.restore()
            self.metrics.close()

    def _log_train(self, loss, grad_norm, mean_loss, steps, seconds, tokens_per_step):
        tokens_per_s = steps * tokens_per_step / max(seconds, 1e-9)
        tflops = tokens_per_s * self.flops_per_token / dist.get_world_size() / 1e12
        lr = self.current_lr()
        if not hasattr(self, "_peak_tflops"):
            self._peak_tflops = peak_tflops(self.cfg.logging.peak_tflops, fp8=bool(self.cfg.parallel.fp8))
        mfu = tflops / self._peak_tflops if self._peak_tflops else None
        tokens = self.stream.consumed_samples * self.cfg.model.seq_length
        self.last_train_loss = (mean_loss, self.step - steps + 1, self.step)
        metrics = {"loss": mean_loss, "last_loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
                   "mfu": mfu, "consumed_samples": self.stream.consumed_samples, "tokens": tokens, **_peak_memory()}
        self.metrics.log(self.step, metrics, console=(
            f"step {self.step:>6}/{self.cfg.train.train_steps} | loss {mean_loss:.4f} | lr {lr:.3e} | "
            f"grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | {tflops:.3f} TFLOP/s/device | "
            f"MFU {f'{100 * mfu:.2f}%' if mfu is not None else 'n/a'} | {count(tokens)} tokens | "
            + progress(self.step, self.cfg.train.train_steps, self._first_step, time.time() - self._loop_start)))

    def eval_window(self, dataset, final: bool = False) -> Tuple[int, int]:
        """(global batches, samples) one evaluation of a held-out set scores: its first eval_steps global batches,
        or all of it (train.eval_full; train.final_eval_full for the `final` one, after the last step); never a
        sample twice (a last partial batch is padded, masked out)."""
        t = self.cfg.train
        full = t.eval_full or (final and t.final_eval_full)
        samples = len(dataset) if full else min(t.eval_steps * t.global_batch_size, len(dataset))
        return -(-samples // t.global_batch_size), samples

    def _log_eval(self, name: str = "valid", final: bool = False) -> float:
        """Score the validation (or test) set; log `<name>_loss`, `<name>_ppl` and `<name>_tokens`. `final`: the
        evaluation after the last step (or train.eval_only)."""
        dataset = getattr(self, f"{name}_ds", None)
        if dataset is None:  # data.split without that part, and no data.<name>_paths
            return float("nan")

        index = {"valid": 1, "test": 2}[name]
        weighted = held_out_is_weighted(self.cfg.data, index)  # sized by eval_steps: no whole set to score
        final = final and not weighted
        loss, tokens = self.evaluate(dataset, final)
        ppl = math.exp(min(loss, 50))
        what = {"valid": "validation", "test": "test"}[name]
        whole = not weighted and self.eval_window(dataset, final)[1] == len(dataset)
        if name == "valid":
            self.last_eval = (loss, tokens, whole)
        self.metrics.log(self.step, {f"{name}_loss": loss, f"{name}_ppl": ppl, f"{name}_tokens": tokens},
                         console=f"step {self.step:>6} | {what} loss {loss:.4f} | ppl {ppl:.2f} | "
                                 f"{eval_scope(tokens, whole)}")
        return loss

    def _log_test(self) -> Dict[str, float]:
        """The test set, scored once at the end (Megatron-LM's do_test)."""
        return {"test_loss": self._log_eval("test", final=True)} if self.test_ds is not None else {}


def _peak_memory() -> Dict[str, float]:
    """Peak GPU memory of this process so far (GiB), on GPU only."""
    if not torch.cuda.is_available():
        return {}
    return {"peak_mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
