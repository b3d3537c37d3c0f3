"""Training the Hugging Face-format model with DeepSpeed ZeRO (stage 0-3), data parallel over every
process, on the same data, schedule and metrics as the Megatron trainer.

What is shared with `rf_megatron.engines.megatron` (so that a run of each engine is comparable):
the run config, the GPTDataset samples and their order (`MicrobatchStream`: global batch k is
samples [k*G, (k+1)*G)), the loss (token mean per microbatch, averaged over microbatches and
ranks), AdamW with Megatron's weight-decay grouping, Megatron's LR schedule object, gradient
clipping, the step loop, JSONL/wandb/TensorBoard metrics and the stop/resume behaviour.

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`, ZeRO-partitioned optimizer state) under
checkpoint.dir/iter_NNNNNNN, plus train_state.json and run_config.yaml, landed by the same commit protocol as the
Megatron engine's (checkpoint_dir.land_checkpoint: written into iter_N.tmp, renamed once whole, then `latest`),
so a crash mid-save resumes from the previous checkpoint.
The LR schedule is a function of the step and optim.*, recomputed on resume.

Every rank builds (or loads) the whole model in host memory before ZeRO partitions it, which is
fine up to a few billion parameters per node; larger models would need `deepspeed.zero.Init`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist

from ..checkpoint_dir import land_checkpoint, read_train_state
from ..config import ConfigError
from ..cross_entropy import token_cross_entropy
from ..data import load_tokenizer
from ..device import backend, init_process_group, on_gpu, select_device, to_device
from ..flops import parameter_counts
from ..hf.weights import lambda_table, uses_remote_code
from ..ports import free_port
from ..run_config import RunConfig
from ..safe_checkpoint import UnsafeCheckpoint, safe_deepspeed_checkpoint_engine
from ..training_loop import TrainingLoop, token_weighted_mean
from ..value_residual_spec import MODES
from . import deepspeed_config as ds_config
from .deepspeed_model import build_fresh, hf_config, hf_state, load_folder, param_groups, read_folder_config, save_folder


def prepare_config(cfg: RunConfig, world_size: int) -> None:
    """Validate `cfg` for DeepSpeed (data parallel only: `parallel`'s TP/PP/CP are Megatron's and not
    used) and take the model from `deepspeed.init_from_hf` when given (the data's seq_length stays, and model.init,
    which no HF config records)."""
    if cfg.deepspeed.init_from_hf:
        model = read_folder_config(cfg.deepspeed.init_from_hf)
        model.seq_length, model.init = cfg.model.seq_length, cfg.model.init
        cfg.model = model
    if cfg.train.nan_policy != "stop":
        raise ConfigError("train.nan_policy=skip is not supported by the DeepSpeed trainer (use stop)")
    if cfg.parallel.fp8 or cfg.parallel.transformer_impl != "local":
        raise ConfigError("parallel.fp8 / transformer_impl are Megatron (Transformer Engine) options; "
                          "the DeepSpeed trainer runs the HF model code: unset them")
    if cfg.parallel.compile_layers:
        raise ConfigError("parallel.compile_layers is the Megatron trainer's option (the DeepSpeed trainer runs the "
                          "HF model eagerly): unset it")
    data_parallel = dataclasses.replace(cfg.parallel, tensor_parallel=1, pipeline_parallel=1,
                                        virtual_pipeline_parallel=None, context_parallel=1, sequence_parallel=False,
                                        recompute_granularity=None)
    RunConfig(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
                 "parallel": data_parallel}).validate(world_size)
    hf_config(cfg.model)  # what transformers refuses (e.g. initializer_range > 1): one line, before any process group


def _init_distributed() -> None:
    """torchrun / the `deepspeed` launcher / slurm/task.sh (srun) all provide RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT; a single process without them runs alone."""
    _plain_gloo_on_cpu()
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise ConfigError("MASTER_PORT is not set: launch with torchrun, deepspeed or slurm/pretrain.sbatch")
        os.environ["MASTER_PORT"] = str(free_port())
    if not dist.is_initialized():
        init_process_group()  # after select_device: NCCL on cuda:LOCAL_RANK, else gloo


def _plain_gloo_on_cpu() -> None:
    """Where collectives run on gloo (the CPU, and the simulated GPU), DeepSpeed's comm backend would JIT-compile a
    shared-memory allreduce (deepspeed_shm_comm: ~2 min of every core, once per environment) to speed up CPU
    training. Our CPU runs stand in for GPU jobs: plain gloo, as Megatron's CPU path uses, is what they need
    (DeepSpeed keeps edits to this dict)."""
    if backend() == "gloo":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedTrainer(TrainingLoop):
    ENGINE = "deepspeed"
    COLLECTIVE_SAVE = False  # each rank torch.saves its own files

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.device = select_device(megatron=False)  # DeepSpeed's own accelerator follows the same decision
        self.cuda = on_gpu()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prepare_config(cfg, world)
        self.ds_config = ds_config.resolve(cfg, world, self.cuda)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        counts = parameter_counts(cfg.model)
        ds_config.check_fits(counts.total, self.ds_config, world, self.cuda)
        self.tokenizer = load_tokenizer(cfg)
        _init_distributed()  # before the checkpoint checks: rank 0 may move a damaged checkpoint aside
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        plan = self.find_resume_checkpoint()

        t, o = cfg.train, cfg.optim
        if cfg.deepspeed.init_from_hf and plan.path is None:
            module = load_folder(cfg.deepspeed.init_from_hf, cfg.model)
        else:
            module = build_fresh(cfg.model, t.seed)

        import deepspeed
        from deepspeed.utils import logger as ds_logger

        from ..build import build_scheduler

        ds_logger.setLevel("WARNING")  # its INFO lines repeat per rank; our console line says what matters
        optimizer = torch.optim.AdamW(param_groups(module), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                      eps=o.adam_eps, weight_decay=o.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.engine.checkpoint_engine = safe_deepspeed_checkpoint_engine()  # its files never run code on resume
        self.scheduler = build_scheduler(self.optimizer, o, t.train_steps)
        self.resume(plan, log_writer=self.rank == 0)
        if cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel > 1:
            self._print(f"note: parallel.* (TP{cfg.parallel.tensor_parallel} x PP{cfg.parallel.pipeline_parallel}) "
                        "is the Megatron trainer's layout; DeepSpeed is data parallel over all processes")
        self._print(f"{self.run_label()}, DeepSpeed ZeRO-{self.stage} on {self.world} process(es) "
                    f"({'cuda' if self.cuda else 'cpu'}, {'bf16' if self.ds_config['bf16']['enabled'] else 'fp32'}), "
                    f"{self.ds_config['gradient_accumulation_steps']} microbatches/step"
                    + (f", from {cfg.deepspeed.init_from_hf}" if cfg.deepspeed.init_from_hf and plan.path is None else ""))

    # --- the step ---------------------------------------------------------------------------------
    def _loss_terms(self, batch):
        """(sum of token losses, token count) of one microbatch, on the device (an all-padding microbatch at the
        end of a whole-set evaluation counts 0 tokens)."""
        batch = to_device(batch)
        logits = self.engine(input_ids=batch["tokens"], position_ids=batch["position_ids"], use_cache=False).logits
        losses = token_cross_entropy(logits, batch["labels"]).flatten()
        mask = batch["loss_mask"].flatten().float()
        return (losses * mask).sum(), mask.sum()

    def train_step(self):
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)  # all-reduced: NCCL needs it on the GPU
        for batch in self.stream.next_global_batch():
            total, count = self._loss_terms(batch)
            self.engine.backward(total / count.clamp(min=1))  # DeepSpeed divides by the accumulation steps
            self.engine.step()  # updates at the accumulation boundary only
            stats += torch.stack([total.detach().double(), count.detach().double()])
        loss = token_weighted_mean(stats)
        self.check_finite("loss", loss, update_applied=True)  # engine.step() has run: DeepSpeed skips only in fp16
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        self.check_finite("grad norm", grad_norm, update_applied=True)
        self.scheduler.step(increment=1)
        return loss, grad_norm, True

    # --- evaluation: every rank scores its share of each global batch -----------------------------
    def add_eval_terms(self, global_batch, stats) -> None:
        for batch in global_batch:
            total, count = self._loss_terms(batch)
            stats += torch.stack([total.double(), count.double()])

    def set_training(self, training: bool) -> None:
        self.engine.train(training)

    def data_parallel(self) -> Dict[str, int]:
        return {"dp_rank": self.rank, "dp_size": self.world}

    def _full_parameters(self, params=None):
        """`params` (default: all) whole on every rank (ZeRO-3 partitions them; 0-2 keep them whole)."""
        import contextlib

        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        params = list(self.engine.module.parameters()) if params is None else params
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def lambdas(self) -> Dict[str, float]:
        if self.cfg.model.variant != "resformer" or not MODES[self.cfg.model.lambda_mode].learnable:
            return {}

        named = {k: p for k, p in self.engine.module.named_parameters() if "value_residual" in k}
        with self._full_parameters(list(named.values())):
            state = {k: p.detach().float().cpu() for k, p in named.items()}
        out = {}
        for layer, (l1, l2) in sorted(lambda_table(state, self.cfg.model).items()):
            out[f"lambda1/layer{layer}"], out[f"lambda2/layer{layer}"] = float(l1), float(l2)
        return out

    # --- checkpoints ----------------------------------------------------------------------------
    def check_resumable(self, path, train_state) -> None:
        if train_state.get("engine", "megatron") != "deepspeed":
            raise ConfigError(f"{path} is a Megatron checkpoint: export it (tools/convert_checkpoint_to_hf.py) and "
                              "start from the folder with deepspeed.init_from_hf, or point checkpoint.dir elsewhere")
        for key, now in self.engine_state().items():
            if train_state[key] != now:
                raise ConfigError(f"{path} was saved with {key}={train_state[key]}, this run has {now}: ZeRO's "
                                  "partitioned optimizer state needs the same (or convert it with DeepSpeed's "
                                  "ds_to_universal.py)")

    def engine_state(self) -> Dict:
        return {"zero_stage": self.stage, "world_size": self.world}

    def load(self, path: Path) -> Dict:
        try:
            load_path, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        except UnsafeCheckpoint as exc:
            error = ConfigError(str(exc))
            error.every_rank = True  # each rank reads its own partition
            raise error from None
        if load_path is None:
            raise ConfigError(f"{path}: DeepSpeed found no checkpoint files there")
        state = read_train_state(path)
        self.scheduler.step(increment=state["step"])
        return state

    def write_checkpoint(self, root: Path, train_state: Dict) -> Path:
        def write_shards(tmp: Path) -> None:  # DeepSpeed names its files per rank, not per tag: the rename is safe
            self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state={}, save_latest=False)

        return land_checkpoint(root, self.step, write_shards, self.run_config_yaml, train_state,
                               self.cfg.checkpoint.keep_last)

    def on_finished(self) -> None:
        """The final weights as an HF folder (like tools/convert_checkpoint_to_hf.py writes)."""
        output = self.cfg.deepspeed.hf_output or os.path.join(self.cfg.logging.dir, "hf")
        with self._full_parameters():
            state = hf_state(self.engine.module, self.cfg.model) if self.rank == 0 else None
        if self.rank == 0:
            source = str(self.cfg.checkpoint.dir or self.cfg.logging.dir)
            save_folder(state, self.cfg, output, self.train_state(), source)
            self._print(f"wrote {Path(output).resolve()} (load with AutoModelForCausalLM.from_pretrained"
                        f"{', trust_remote_code=True' if uses_remote_code(self.cfg.model) else ''})")
        dist.barrier()
