"""The Hugging Face side of an export: the folder's config files, model card and weight shards, written into a
temp folder that is renamed into place when complete (`fresh_tmp`, `publish`)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from ..value_residual_spec import MODES
from .weights import AUTO_MAP, RFGPT_FILES, ConversionError, hf_config_kwargs, uses_remote_code

HERE = Path(__file__).resolve().parent
RUN_CONFIG_COPY = "rf_megatron_run_config.yaml"
TRAIN_STATE_COPY = "rf_megatron_train_state.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# The HF folder
# --------------------------------------------------------------------------------------------------
def build_hf_config(model, special: Dict[str, Optional[int]], dtype: str):
    """LlamaConfig / RFGPTConfig of a model config; what transformers' validation refuses (e.g.
    initializer_range > 1) is a one-line ConversionError."""
    from huggingface_hub.errors import StrictDataclassError

    kwargs = hf_config_kwargs(model, special)
    try:
        if uses_remote_code(model):
            from .configuration_rfgpt import RFGPTConfig

            config = RFGPTConfig(**kwargs)
            config.architectures = ["RFGPTForCausalLM"]
            config.auto_map = dict(AUTO_MAP)
        else:
            from transformers import LlamaConfig

            config = LlamaConfig(**kwargs)
            config.architectures = ["LlamaForCausalLM"]
    except (ValueError, StrictDataclassError) as exc:
        raise ConversionError("the HF config cannot take this model: "
                              + " ".join(line.strip() for line in str(exc).splitlines() if line.strip())) from None
    config.dtype = "float32" if dtype == "fp32" else "bfloat16"
    return config


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def model_card(cfg, train_state: dict, params: int, lambdas, remote: bool, dtype: str, source: Path,
               engine: Optional[str] = None, tokenizer: bool = True) -> str:
    """README.md of an HF folder. `engine`: the DeepSpeed trainer's layout (None: a Megatron export)."""
    m, p, o, t = cfg.model, cfg.parallel, cfg.optim, cfg.train
    variant = {"vanilla": "vanilla (Llama-style baseline)",
               "resformer": f"ResFormer, lambda_mode={m.lambda_mode}",
               "svformer": "SVFormer (layers >= 2 share layer 1's values; no value projection)"}[m.variant]
    lines = [
        f"# {cfg.name} ({m.variant})", "",
        "A value-residual GPT ([arXiv 2410.17897](https://arxiv.org/abs/2410.17897)) trained with rf-megatron "
        + ("(Megatron-Core) and converted with `tools/convert_checkpoint_to_hf.py`." if engine is None else
           "(DeepSpeed, `pretrain/pretrain_hf_deepspeed.py`)."), "",
        f"- variant: {variant}",
        f"- parameters: {params:,} ({dtype})",
        f"- shape: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
        f"{m.kv_heads} KV heads, FFN {m.ffn_size} (SwiGLU), RMSNorm, RoPE base "
        f"{m.rotary_base}, vocab {m.vocab_size}, {'untied' if m.untie_embeddings_and_output_weights else 'tied'} "
        f"embeddings{', q/k layernorm' if m.qk_layernorm else ''}",
    ]
    if m.variant == "resformer":
        lines += ["", "## Value-residual lambdas", "",
                  "V'_n = lambda1 * V_1 + lambda2 * V_n for the layers listed (1-based); other layers are plain "
                  "attention." + (" Values read from the weights." if MODES[m.lambda_mode].learnable else ""),
                  "", "| layer | lambda1 | lambda2 |", "|---|---|---|"]
        lines += [f"| {n} | {_fmt(a)} | {_fmt(b)} |" for n, (a, b) in sorted(lambdas.items())]
    elif m.variant == "svformer":
        lines += ["", "SVFormer's KV cache (`SharedValueCache` in modeling_rfgpt.py) stores the keys of every "
                  "layer and the values once: (L+1)/(2L) of a vanilla model's cache."]
    lines += [
        "", "## Training", "",
        f"- steps: {train_state.get('step')} ({train_state.get('consumed_samples')} samples of "
        f"{m.seq_length} tokens), global batch {t.global_batch_size}, micro batch {t.micro_batch_size}",
        f"- optimizer: AdamW lr {o.lr} -> {o.min_lr} ({o.lr_decay_style}, {o.lr_warmup_steps} warmup steps), "
        f"betas ({o.adam_beta1}, {o.adam_beta2}), weight decay {o.weight_decay}, clip {o.clip_grad}",
        (f"- layout: {engine}, {p.params_dtype}" if engine else
         f"- layout: TP{p.tensor_parallel} x PP{p.pipeline_parallel}"
         + (f" x VPP{p.virtual_pipeline_parallel}" if p.virtual_pipeline_parallel else "")
         + f", {p.params_dtype}" + (", distributed optimizer" if p.distributed_optimizer else "")),
        f"- data: {', '.join(str(x) for x in cfg.data.paths) or '-'}; tokenizer "
        + (Path(str(cfg.data.tokenizer_model)).name if tokenizer else "not included (weights-only export)"),
        f"- source checkpoint: `{source}`; the full run config is in `{RUN_CONFIG_COPY}`",
        "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "tok = AutoTokenizer.from_pretrained(path" + (", trust_remote_code=True)" if remote else ")"),
        "model = AutoModelForCausalLM.from_pretrained(path" + (", trust_remote_code=True)" if remote else ")"),
        "out = model.generate(**tok(\"the king\", return_tensors=\"pt\"), max_new_tokens=32, do_sample=False)",
        "print(tok.decode(out[0]))", "```", "",
        "The tokenizer adds no BOS/EOS (the pretraining data had none; `</s>` separated documents).", "",
    ]
    return "\n".join(lines)


def write_config_files(folder: Path, model, special: Dict[str, Optional[int]], dtype: str) -> None:
    """config.json (+ the RFGPT code files) and generation_config.json."""
    from transformers import GenerationConfig

    build_hf_config(model, special, dtype).save_pretrained(str(folder))
    if uses_remote_code(model):
        for name in RFGPT_FILES:  # the spec's real file sits below hf/ (hf/value_residual_spec.py re-exports it)
            shutil.copyfile(HERE.parent / name if name == "value_residual_spec.py" else HERE / name, folder / name)
    GenerationConfig(bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
                     pad_token_id=special.get("pad"), do_sample=False).save_pretrained(str(folder))


def write_model_files(folder: Path, hf_state, model, special: Dict[str, Optional[int]], dtype: str,
                      shard_bytes: int):
    """The config files and the sharded safetensors of an in-memory HF state dict."""
    from .safetensors_io import save_sharded

    write_config_files(folder, model, special, dtype)
    return save_sharded(hf_state, folder, shard_bytes)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(output: Path, log=print) -> None:
    """Clean up after earlier conversions to `output` that were killed (their process no longer runs on this
    machine; a running one's folders are kept): remove their temp folders (`.NAME.tmp-PID`, `.NAME.work-PID`; a
    70B conversion's is 140 GB), and put back an output that a `--force` replacement had moved aside
    (`.NAME.old-PID`) when the kill came before the new one was in place."""
    output = Path(output)
    prefix = f".{output.name}."
    if not output.parent.is_dir():
        return
    for path in sorted(output.parent.iterdir()):
        kind, _, pid = path.name[len(prefix):].rpartition("-")
        if not (path.name.startswith(prefix) and kind in ("tmp", "work", "old") and pid.isdigit()
                and int(pid) != os.getpid() and not _running(int(pid))):
            continue
        if kind == "old" and not output.exists():
            path.rename(output)
            log(f"restored {output} from {path} (a --force replacement was interrupted before the new one was in)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path} (left by an interrupted conversion)")


def fresh_tmp(output: Path, log=print) -> Path:
    """`.NAME.tmp-PID` next to `output`, empty, after removing what killed conversions left there."""
    remove_leftovers(output, log)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, output: Path, force: bool) -> None:
    """Rename the finished temp folder into place (replacing an old output only with force)."""
    old = None
    if output.exists():
        if not force:
            raise ConversionError(f"output {output} exists (pass --force to replace it)")
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
