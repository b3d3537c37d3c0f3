"""The DeepSpeed config of a run: a preset (rf_megatron/presets/deepspeed/zero{1,2,3}.json) or the
user's JSON file, with `"auto"` (or missing) values filled from the run config, as the Hugging Face
Trainer does, and checked against the run config and the world size before anything is built.

The run config owns what both engines share, so a value set in both places must agree:
batch sizes, gradient clipping, precision. AdamW and the LR schedule always come from `optim.*`
(built by the trainer), so the JSON must not carry "optimizer" / "scheduler" sections.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict

from ..config import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets" / "deepspeed"  # package data
GIB = 1024 ** 3


def load(spec: str) -> Dict[str, Any]:
    path = Path(spec)
    if not (path.suffix == ".json" and path.is_file()):
        path = PRESET_DIR / f"{spec}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.json")))
        raise ConfigError(f"deepspeed.config={spec!r} is neither a JSON file nor a preset ({known})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config={path}: invalid JSON ({exc})") from None


def _fill(section: Dict[str, Any], key: str, want, what: str, source: str) -> None:
    """Set `auto`/missing to `want`; an explicit different value is an error naming both places."""
    have = section.get(key, "auto")
    if have == "auto":
        section[key] = want
    elif have != want:
        raise ConfigError(f"DeepSpeed config {source}: {key}={have!r} but {what}={want!r} in the run config "
                          f"(set it to \"auto\" or make them agree)")


def resolve(cfg, world_size: int, cuda: bool) -> Dict[str, Any]:
    """The DeepSpeed config dict for `cfg` (a RunConfig) on `world_size` processes."""
    t, ds = cfg.train, cfg.deepspeed
    conf = copy.deepcopy(load(ds.config))
    src = ds.config
    for section in ("optimizer", "scheduler"):
        if section in conf:
            raise ConfigError(f"DeepSpeed config {src}: remove its {section!r} section; AdamW and the LR schedule "
                              "come from optim.* (the same as the Megatron trainer's)")
    if conf.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"DeepSpeed config {src}: fp16 is not supported (loss scaling); use bf16")
    if (conf.get("checkpoint") or {}).get("use_node_local_storage"):
        raise ConfigError(f"DeepSpeed config {src}: checkpoint.use_node_local_storage is not supported: a checkpoint "
                          "is committed once, in checkpoint.dir, which every node must see")
    zero = conf.setdefault("zero_optimization", {})
    if ds.zero_stage is not None:
        zero["stage"] = ds.zero_stage
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage {stage!r}: choose 0, 1, 2 or 3")
    per_step = t.micro_batch_size * world_size  # divides the global batch (RunConfig.validate)
    _fill(conf, "train_batch_size", t.global_batch_size, "train.global_batch_size", src)
    _fill(conf, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", src)
    _fill(conf, "gradient_accumulation_steps", t.global_batch_size // per_step,
          f"train.global_batch_size/(micro_batch_size*{world_size} processes)", src)
    _fill(conf, "gradient_clipping", cfg.optim.clip_grad, "optim.clip_grad", src)
    bf16 = conf.setdefault("bf16", {})
    _fill(bf16, "enabled", cfg.parallel.params_dtype == "bf16", "parallel.params_dtype == 'bf16'", src)
    if cfg.parallel.params_dtype == "fp16":
        raise ConfigError("parallel.params_dtype=fp16: the DeepSpeed trainer supports fp32 and bf16")
    if bf16["enabled"] and not cuda:
        raise ConfigError("parallel.params_dtype=bf16 needs a GPU here (DeepSpeed's CPU path trains in fp32): "
                          "use parallel.params_dtype=fp32 on CPU")
    conf["zero_allow_untested_optimizer"] = True  # our AdamW is torch's, which ZeRO handles fine
    conf.setdefault("steps_per_print", 10 ** 12)  # progress is our own console line
    return conf


def model_state_bytes_per_process(params: int, stage: int, world_size: int, bf16: bool) -> float:
    """Weights, gradients and AdamW state (fp32 master, m, v) per process under ZeRO `stage`.
    Activations and buffers come on top: this is the floor, not the total."""
    weight = grad = 2 if bf16 else 4
    optim = 12  # ZeRO keeps an fp32 copy of its partition plus Adam's m and v
    n = world_size
    per_param = {0: weight + grad + optim, 1: weight + grad + optim / n,
                 2: weight + (grad + optim) / n, 3: (weight + grad + optim) / n}[stage]
    return params * per_param


def device_memory_bytes(cuda: bool) -> float:
    """What one process may use: its GPU's memory, or an equal share of the host's available RAM."""
    if cuda:
        import torch

        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    import psutil

    per_node = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "1"
    return psutil.virtual_memory().available / max(int(per_node.split("(")[0]), 1)


def check_fits(params: int, conf: Dict[str, Any], world_size: int, cuda: bool) -> None:
    stage, bf16 = conf["zero_optimization"]["stage"], conf["bf16"]["enabled"]
    need = model_state_bytes_per_process(params, stage, world_size, bf16)
    have = device_memory_bytes(cuda)
    if need > have:
        where = "GPU memory" if cuda else "host memory available per process"
        advice = "a higher ZeRO stage (deepspeed.zero_stage), more processes" if stage < 3 else "more processes"
        raise ConfigError(f"the model does not fit: ZeRO-{stage} on {world_size} process(es) needs about "
                          f"{need / GIB:.1f} GiB per process for the weights, gradients and AdamW state of "
                          f"{params / 1e6:,.0f}M parameters, more than the {have / GIB:.1f} GiB of {where}: use "
                          f"{advice}{'' if bf16 or not cuda else ', or bf16'}, or a smaller model")
