"""Build a trainable model: Megatron DDP-wrapped chunks and Megatron's (distributed) optimizer.

Process groups must exist (`init_parallel`) before `build_model`.
"""
from __future__ import annotations

from typing import List, Optional

import torch.distributed as dist

from . import cross_entropy, layer_compile, step_kernels
from .config import ModelConfig, OptimConfig, ParallelConfig, build_transformer_config
from .device import current_device, on_gpu, simulated
from .grads import finalize_model_grads
from .model import build_model_chunks


def init_parallel(parallel: ParallelConfig, seed: int = 1234, backend: Optional[str] = None) -> None:
    """torch.distributed (from torchrun / SLURM env vars) plus Megatron's model-parallel groups."""
    from megatron.core import parallel_state, tensor_parallel

    from .device import init_process_group, select_device

    select_device()  # cuda:LOCAL_RANK (set as the current device), or CPU mode
    if not dist.is_initialized():
        if backend:
            dist.init_process_group(backend)
        else:
            init_process_group()
    parallel.validate(dist.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
            context_parallel_size=parallel.context_parallel,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_model(model_cfg: ModelConfig, parallel: ParallelConfig, *, before_ddp=None):
    """Returns (DDP-wrapped model chunks, TransformerConfig) on the decided device (rf_megatron.device):
    built there directly on a GPU (CPU initialisation only in CPU mode), then every chunk is moved there
    whole (our norms and lambdas are made on the host, like Megatron-LM's get_model expects).
    `before_ddp(chunks)` may load weights."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = build_transformer_config(model_cfg, parallel, cpu=not on_gpu())
    loss = cross_entropy.resolve(parallel.cross_entropy, parallel.tensor_parallel, on_gpu() and not simulated())
    chunks = build_model_chunks(model_cfg, config, parallel.transformer_impl, cross_entropy=loss,
                                compile_fallback=parallel.cross_entropy == "auto")
    for chunk in chunks:
        chunk.to(current_device())
    if parallel.compile_layers:
        layer_compile.compile_layers(chunks)
    if before_ddp is not None:
        before_ddp(chunks)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c) for c in chunks]
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, config


def build_optimizer(model: List, optim: OptimConfig, parallel: ParallelConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optim.validate()
    dtype = parallel.params_dtype
    cfg = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=dtype == "bf16", fp16=dtype == "fp16",
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    step_kernels.install()
    optimizer = get_megatron_optimizer(cfg, model)
    step_kernels.use_fused_adam(optimizer, wants_fused_adam(optim))
    return optimizer


def wants_fused_adam(optim: OptimConfig) -> bool:
    """optim.fused; None: on a GPU (torch's fused AdamW, where Megatron uses torch's AdamW)."""
    return optim.fused if optim.fused is not None else on_gpu()


def build_scheduler(optimizer, optim: OptimConfig, train_steps: int):
    """Megatron's LR / weight-decay schedule (linear warmup from 0, then cosine / WSD / linear /
    constant to min_lr at train_steps; no decay on 1-D parameters via their group's wd_mult). It only
    touches `optimizer.param_groups`, so the DeepSpeed trainer uses it too: same schedule, both engines.

    On resume only the step count comes from the checkpoint: the run config owns the schedule, so
    extending train.train_steps (or changing optim.lr) takes effect instead of being silently replaced
    by the checkpoint's values (TrainingLoop.note_changes says what changed)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = optim
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=train_steps, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=train_steps, wd_incr_style="constant",
        wsd_decay_steps=o.lr_wsd_decay_steps, lr_wsd_decay_style="cosine" if o.lr_decay_style == "WSD" else None,
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
