"""The model DeepSpeed trains: the very classes the Hugging Face export ships (LlamaForCausalLM for
vanilla, `rf_megatron.hf.modeling_rfgpt.RFGPTForCausalLM` for ResFormer / SVFormer), built fresh
from a model config or loaded from an HF folder, and written back as an HF folder at the end.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, List

import torch

from ..config import ConfigError, ModelConfig
from ..hf.folder import (DTYPES, RUN_CONFIG_COPY, TRAIN_STATE_COPY, build_hf_config, fresh_tmp, model_card, publish,
                         write_model_files)
from ..hf.weights import ConversionError, lambda_table, model_config_from_hf, uses_remote_code


def model_class(model: ModelConfig):
    if uses_remote_code(model):
        from ..hf.modeling_rfgpt import RFGPTForCausalLM

        return RFGPTForCausalLM
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def hf_config(model: ModelConfig):
    """The HF config of `model`; what transformers refuses (e.g. initializer_range > 1) is a ConfigError."""
    try:
        return build_hf_config(model, {}, "fp32")
    except ConversionError as exc:
        raise ConfigError(str(exc)) from None


OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # Megatron's linear_proj, linear_fc2


def build_fresh(model: ModelConfig, seed: int):
    """A newly initialised model, as the Megatron trainer initialises it for `model.init`: HF's init (normal(0,
    model.init_method_std) for every linear and the embedding, norms 1, lambdas as value_residual_spec says) is
    `paper`; `megatron` also scales the output projections' std by 1/sqrt(2 num_layers)."""
    torch.manual_seed(seed)
    module = model_class(model)(hf_config(model)).float()
    if model.init == "megatron":
        std = model.init_method_std / math.sqrt(2.0 * model.num_layers)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if name.endswith(OUTPUT_PROJECTIONS):
                    param.normal_(0.0, std)
    return module


def read_folder_config(folder) -> ModelConfig:
    """The model config of an HF folder, or one line saying why it is not a model this trainer knows."""
    folder = Path(folder)
    config_json = folder / "config.json"
    if not config_json.is_file():
        raise ConfigError(f"deepspeed.init_from_hf={folder}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(config_json.read_text())
        if config.get("model_type") == "rfgpt" and "modeling_rfgpt" not in json.dumps(config.get("auto_map", {})):
            raise ConversionError("model_type=rfgpt without rf-megatron's modeling_rfgpt in auto_map")
        return model_config_from_hf(config)
    except (ConversionError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"deepspeed.init_from_hf={folder} is not an rf-megatron / Llama model: {exc}") from None


def load_folder(folder, model: ModelConfig):
    """Weights of an HF folder into our class; every tensor must match (no silent re-initialisation)."""
    from transformers.utils import logging as hf_logging

    cls = model_class(model)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report would repeat, per rank, what we check below
    hf_logging.disable_progress_bar()
    try:
        loaded, info = cls.from_pretrained(str(folder), config=hf_config(model),
                                           dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"deepspeed.init_from_hf={folder}: cannot load the weights ({str(exc).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:  # restore, not force on: quiet() may have switched them off for the whole run
            hf_logging.enable_progress_bar()
    problems = [f"{what}: {', '.join(sorted(info[key])[:4])}" for key, what in
                (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "wrong shape"))
                if info.get(key)]
    if problems:
        raise ConfigError(f"deepspeed.init_from_hf={folder}: weights do not match the model in its config.json "
                          f"({'; '.join(problems)})")
    return loaded


def param_groups(module: torch.nn.Module) -> List[dict]:
    """Megatron's rule: no weight decay on 1-D parameters (norms, lambdas) and biases (wd_mult 0)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


def hf_state(module: torch.nn.Module, model: ModelConfig) -> Dict[str, torch.Tensor]:
    """The HF tensors to save (the tied lm_head is the embedding and is not saved twice)."""
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if not model.untie_embeddings_and_output_weights:
        state.pop("lm_head.weight", None)
    return state


def save_folder(state: Dict[str, torch.Tensor], cfg, output, train_state: dict, source: str,
                max_shard_bytes: int = 5 * 1024 ** 3) -> Path:
    """An HF folder like the exporter's (weights, code, tokenizer, model card, run config), written
    next to `output` and renamed into place (replacing an older one)."""
    from ..hf.tokenizer import save_hf_tokenizer
    from ..run_config import save_yaml

    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    dtype = "bf16" if cfg.parallel.params_dtype == "bf16" else "fp32"
    tmp = fresh_tmp(output)
    try:
        _, special = save_hf_tokenizer(cfg.data.tokenizer_model, tmp, model_max_length=cfg.model.seq_length)
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
        write_model_files(tmp, state, cfg.model, special, dtype, max_shard_bytes)
        save_yaml(cfg, tmp / RUN_CONFIG_COPY)
        (tmp / TRAIN_STATE_COPY).write_text(json.dumps(train_state))
        card = model_card(cfg, train_state, sum(v.numel() for v in state.values()), lambda_table(state, cfg.model), uses_remote_code(cfg.model),
                          dtype, source, engine=f"DeepSpeed ZeRO-{train_state['zero_stage']}, "
                                                f"{train_state['world_size']} process(es)")
        (tmp / "README.md").write_text(card)
        publish(tmp, output, force=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
