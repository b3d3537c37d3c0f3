"""The Megatron-Core engine: Megatron's pieces (DDP, (distributed) optimizer, param scheduler, pipeline schedules,
dist_checkpointing, GPTDataset) behind TrainingLoop's engine contract (rf_megatron/training_loop.py).
"""
from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps

from .. import distopt_fixes, step_kernels
from ..build import build_model, build_optimizer, build_scheduler, init_parallel, wants_fused_adam
from ..checkpoint_dir import other_checkpoint_hint
from ..checkpointing import load_checkpoint, save_checkpoint
from ..config import ConfigError
from ..data import chunk_iterators, load_tokenizer
from ..errors import first_line
from ..device import current_device, select_device, to_device
from ..flops import parameter_counts
from ..model import unwrap
from ..run_config import RunConfig
from ..schedule import forward_backward
from ..training_loop import TrainingLoop, token_weighted_mean


def _loss_func(loss_mask, output_tensor):
    """(mean loss of the microbatch, {"lm loss": [loss sum, tokens]}); an all-padding microbatch (the end of a
    whole-set evaluation) counts 0 tokens."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(output_tensor.float().reshape(-1) * mask)
    count = mask.sum()
    return total / count.clamp(min=1), {"lm loss": torch.stack([total.detach(), count.detach()])}


def _forward_step(data_iterator, model):
    batch = to_device(next(data_iterator))  # host-collated microbatch -> the GPU (Megatron-LM's get_batch)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, lambda out: _loss_func(batch["loss_mask"], out)


def run_global_batch(model: List, microbatches: List[Dict], seq_length: int, forward_only: bool = False) -> List[Dict]:
    """Megatron's schedule (rf_megatron/schedule.py) over one global batch of host microbatches on this rank: forward
    and backward (or forward only), each microbatch's {"lm loss": [loss sum, tokens]} on the loss stage."""
    return forward_backward(
        model_chunks=model, forward_step_func=_forward_step,
        data_iterator=chunk_iterators(microbatches, len(model)), num_microbatches=len(microbatches),
        seq_length=seq_length, micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=forward_only)


def holds_the_loss() -> bool:
    """The last pipeline stage's TP rank 0 holds the losses (one copy per data-parallel replica)."""
    return ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0


def _global_loss(losses: List[Dict]) -> float:
    """Token-weighted mean loss over microbatches and DP ranks, known on every rank."""
    stats = torch.zeros(2, dtype=torch.float64, device=current_device())
    if holds_the_loss():
        for item in losses:
            stats += item["lm loss"].double()
    return token_weighted_mean(stats)


def compile_error(exc: Exception, parallel) -> Optional[ConfigError]:
    """A torch.compile failure (no C++ compiler or Triton, a compiler bug) as one line naming the options that
    avoid it, where this run asked for compilation explicitly (auto's loss falls back by itself); else None."""
    dynamo = sys.modules.get("torch._dynamo.exc")  # imported by any compilation: nothing to import here
    way_out = [o for o, on in (("parallel.compile_layers=false", parallel.compile_layers),
                               ("parallel.cross_entropy=megatron", parallel.cross_entropy == "compiled")) if on]
    if dynamo is None or not isinstance(exc, dynamo.TorchDynamoException) or not way_out:
        return None
    return ConfigError(f"torch.compile failed ({first_line(exc)}): set {' and '.join(way_out)}")


class Trainer(TrainingLoop):
    """Megatron-Core engine: TP / SP / PP (1F1B, interleaved) / DP with the (distributed) optimizer."""

    ENGINE = "megatron"

    def __init__(self, cfg: RunConfig):
        """`cfg` as the entry point validated it (rf_megatron/cli/train.py: once, before Megatron is imported)."""
        super().__init__(cfg)
        self.device = select_device()  # a GPU job without GPUs stops here, before any process group exists
        self.tokenizer = load_tokenizer(cfg)
        init_parallel(cfg.parallel, seed=cfg.train.seed)
        distopt_fixes.apply_if_needed()
        self.ps = ps
        torch.manual_seed(cfg.train.seed)
        self.model, self.config = build_model(cfg.model, cfg.parallel)
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.parallel)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.train_steps)
        plan = self.find_resume_checkpoint()
        self.resume(plan, log_writer=holds_the_loss() and ps.get_data_parallel_rank() == 0)
        counts = parameter_counts(cfg.model)
        self._print(f"{self.run_label()} ({counts.non_embedding / 1e6:.2f}M non-embedding), "
                    f"world {dist.get_world_size()} = TP{cfg.parallel.tensor_parallel} x PP{cfg.parallel.pipeline_parallel}"
                    f" x DP{ps.get_data_parallel_world_size()}, {self.stream.num_microbatches} microbatches/step")

    def _run_batch(self, microbatches, forward_only=False):
        try:
            return run_global_batch(self.model, microbatches, self.cfg.model.seq_length, forward_only)
        except Exception as exc:
            error = compile_error(exc, self.cfg.parallel)
            if error is None:
                raise
            raise error from exc

    def train_step(self):
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = _global_loss(self._run_batch(self.stream.next_global_batch()))
        if not math.isfinite(loss):
            self.check_finite("loss", loss)
            self._print(f"step {self.step + 1}: loss is {loss}, skipping the update (train.nan_policy=skip)")
            return loss, float("nan"), False
        ok, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        self.check_finite("grad norm", grad_norm, update_applied=ok)
        self.scheduler.step(increment=1)
        return loss, grad_norm, ok

    # --- evaluation: the last pipeline stage's TP rank 0 holds the losses ------------------------------
    def add_eval_terms(self, global_batch, stats) -> None:
        for item in self._run_batch(global_batch, forward_only=True):
            stats += item["lm loss"].double()

    def counts_eval_terms(self) -> bool:
        return holds_the_loss()

    def set_training(self, training: bool) -> None:
        for m in self.model:
            m.train(training)

    def lambdas(self) -> Dict[str, float]:
        """Per-layer (lambda1, lambda2) of learnable variants, gathered from every stage."""
        mine = {}
        for chunk in self.model:
            for layer in unwrap(chunk).decoder.layers:
                lam = getattr(layer.self_attention, "value_lambdas", None)
                if lam is not None and lam.learnable:
                    with torch.no_grad():
                        l1, l2 = lam()
                    mine[f"lambda1/layer{layer.layer_number}"] = float(l1.detach())  # may be the parameter
                    mine[f"lambda2/layer{layer.layer_number}"] = float(l2.detach())
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return {k: v for part in gathered for k, v in sorted(part.items())}

    # --- checkpoints: Megatron dist_checkpointing (rf_megatron.checkpointing) ------------------------
    def check_resumable(self, path, train_state) -> None:
        if train_state.get("engine", "megatron") != "megatron":
            raise ConfigError(f"{path} is a {train_state['engine']} checkpoint: resume it with "
                              "pretrain/pretrain_hf_deepspeed.py, or point checkpoint.dir elsewhere")
        saved = train_state.get("distributed_optimizer")
        if saved is not None and saved != self.cfg.parallel.distributed_optimizer:
            raise ConfigError(f"{path} was saved with parallel.distributed_optimizer={str(saved).lower()}: "
                              "resume with the same setting (Megatron's optimizer checkpoint formats differ)")

    def load(self, path):
        cfg = self.cfg
        saved_optim = (yaml.safe_load((path / "run_config.yaml").read_text()) or {}).get("optim") or {}
        # Megatron >= 0.19 pairs saved and current param groups by their lr range: load with the
        # checkpoint's, then hand the schedule to the run config (see build_scheduler)
        self._set_lr_range(saved_optim.get("lr", cfg.optim.lr), saved_optim.get("min_lr", cfg.optim.min_lr))
        try:
            state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a damaged checkpoint: one line, not a stack trace per rank (torch
            # DCP's CheckpointException is a BaseException)
            first = (str(exc).strip().splitlines() or [''])[0][:300]
            error = ConfigError(f"cannot load {path}: {type(exc).__name__}: {first}"
                                f"{other_checkpoint_hint(path.parent, besides=path)}")
            error.every_rank = True
            raise error from None
        self._set_lr_range(cfg.optim.lr, cfg.optim.min_lr)
        step_kernels.use_fused_adam(self.optimizer, wants_fused_adam(cfg.optim))  # the checkpoint's flags -> ours
        self.scheduler.step(increment=0)
        return state

    def engine_state(self) -> Dict:
        return {"distributed_optimizer": self.cfg.parallel.distributed_optimizer}

    def write_checkpoint(self, root, train_state):
        return save_checkpoint(root, self.step, self.model, self.optimizer, self.scheduler, train_state,
                               self.run_config_yaml, self.cfg.checkpoint.keep_last)

    def _set_lr_range(self, max_lr: float, min_lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = max_lr, min_lr

    def close(self) -> None:
        self.ps.destroy_model_parallel()
        super().close()
