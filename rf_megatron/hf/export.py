"""Megatron dist checkpoint (any TP / PP / virtual-PP / DP layout) -> Hugging Face folder, streamed.

One CPU process, memory flat in depth: the torch_dist checkpoint is read one layer at a time
(`dist_tensors.DistCheckpointTensors`: only that layer's chunks, whatever layout wrote them), mapped to HF
names (`weights.layer_to_hf`) and appended to safetensors shards whose headers were planned from the checkpoint
metadata alone (`safetensors_io.StreamingShardWriter`). The working set is one layer (or the embedding), not
the model. Verification: small models load both models and compare logits; large ones read every written
tensor back against the checkpoint (`--verify`). The folder is written into `.<name>.tmp-<pid>/` next to the
output and renamed at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from ..checkpoint_dir import verify_checkpoint
from .weights import (AUTO_MAP, RFGPT_FILES, ConversionError, check_exportable, global_names_to_hf, hf_config_kwargs,
                      lambda_table, layer_to_hf, uses_remote_code)

HERE = Path(__file__).resolve().parent
RUN_CONFIG_COPY = "rf_megatron_run_config.yaml"
TRAIN_STATE_COPY = "rf_megatron_train_state.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VERIFY_MODES = ("auto", "logits", "weights", "none")
LOGITS_CHECK_MAX_BYTES = 4 * 10**9  # --verify auto: the logits check holds both models (~3x the fp32 weights)


# --------------------------------------------------------------------------------------------------
# Finding and checking a checkpoint (no Megatron import: errors come fast)
# --------------------------------------------------------------------------------------------------
def resolve_checkpoint(path) -> Path:
    """A checkpoint root (follows `latest`) or an `iter_N` directory -> the iter directory, checked
    for completeness."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"checkpoint {path}: no such directory")
    if (path / "latest").exists():
        name = (path / "latest").read_text().strip()
        it = path / name
        if not it.is_dir():
            raise ConversionError(f"incomplete checkpoint: {path}/latest names {name}, which does not exist")
    elif path.name.startswith("iter_"):
        it = path
    else:
        raise ConversionError(f"checkpoint {path}: neither a checkpoint root (no 'latest' file) nor an iter_N directory")
    if it.name.endswith(".tmp"):
        raise ConversionError(f"incomplete checkpoint {it}: a save that never finished (.tmp)")
    for name in ("train_state.json", "run_config.yaml", "metadata.json", ".metadata"):
        if not (it / name).exists():
            raise ConversionError(f"incomplete checkpoint {it}: no {name}")
    return it


def check_shard_files(it: Path) -> None:
    """Every data file named by the torch_dist metadata must exist."""
    from torch.distributed.checkpoint import FileSystemReader

    from ..safe_metadata import UnsafeCheckpoint, install

    install()  # opening a checkpoint never runs code (rf_megatron/safe_metadata.py)
    try:
        metadata = FileSystemReader(str(it)).read_metadata()
    except UnsafeCheckpoint as exc:
        raise ConversionError(str(exc)) from None
    except Exception as exc:  # a truncated or foreign .metadata
        raise ConversionError(f"incomplete checkpoint {it}: cannot read .metadata ({type(exc).__name__})") from None
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    missing = [f for f in files if not (it / f).exists()]
    if missing:
        raise ConversionError(f"incomplete checkpoint {it}: missing {', '.join(missing[:4])}"
                              + (" ..." if len(missing) > 4 else ""))


def read_run_config(it: Path):
    from ..config import LAMBDA_MODES, VARIANTS, ConfigError
    from ..run_config import load_run_config

    try:
        cfg = load_run_config(str(it / "run_config.yaml"))
    except ConfigError as exc:
        raise ConversionError(f"{it}/run_config.yaml: {exc}") from None
    model = cfg.model
    if model.variant not in VARIANTS:
        raise ConversionError(f"unknown variant {model.variant!r} in {it}/run_config.yaml "
                              f"(known: {', '.join(VARIANTS)})")
    if model.variant == "resformer" and model.lambda_mode not in LAMBDA_MODES:
        raise ConversionError(f"unknown lambda_mode {model.lambda_mode!r} in {it}/run_config.yaml "
                              f"(known: {', '.join(LAMBDA_MODES)})")
    check_exportable(model)
    return cfg


def find_tokenizer(cfg, override: Optional[str]) -> Optional[Path]:
    """--tokenizer, else the run config's; None when neither names one (a weights-only export)."""
    path = override or cfg.data.tokenizer_model
    if not path:
        return None
    if not Path(path).is_file():
        raise ConversionError(f"missing tokenizer: {path} not found (pass --tokenizer PATH to the SentencePiece "
                              "model, or --no-tokenizer for the weights alone)")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Megatron in one CPU process
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def megatron_single_process():
    """CPU mode, a 1-rank gloo group and TP1 x PP1 model-parallel state (reusing what exists). Conversion runs
    on the CPU by design, on any machine: it holds one layer's weights at a time, not a training job's GPUs."""
    import torch.distributed as dist

    from ..device import select_device

    select_device(cpu=True, why_cpu="checkpoint conversion")
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ConversionError("the converter runs in ONE process (found a process group of "
                              f"{dist.get_world_size()}); do not launch it with torchrun")
    from megatron.core import parallel_state, tensor_parallel

    own_mp = not parallel_state.model_parallel_is_initialized()
    if own_mp:
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    elif (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()) != (1, 1):
        raise ConversionError("model parallel state is already initialised with TP/PP > 1")
    try:
        yield
    finally:
        if own_mp:
            parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def load_megatron_model(it: Path, cfg):
    """The TP1 x PP1 model with the checkpoint's weights (call inside megatron_single_process)."""
    from megatron.core import dist_checkpointing

    from ..config import ParallelConfig, build_transformer_config
    from ..model import build_model_chunks

    parallel = ParallelConfig()  # fp32; dist_checkpointing casts bf16 checkpoints on load
    model = build_model_chunks(cfg.model, build_transformer_config(cfg.model, parallel, cpu=True))[0]
    from ..safe_metadata import install

    install()
    try:
        loaded = dist_checkpointing.load({"model0": model.sharded_state_dict()}, str(it))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"cannot load the model from {it}: {first[:300]}") from None
    model.load_state_dict(loaded["model0"])
    model.eval()
    return model


def megatron_state(model) -> Dict[str, torch.Tensor]:  # the in-memory mapping, for tests
    return {k: v.detach() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    seq = tokens.shape[1]
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    positions = torch.arange(seq).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, positions, mask).float()


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
        f"{m.kv_heads} KV heads, FFN {m.ffn_hidden_size or 4 * m.hidden_size} (SwiGLU), RMSNorm, RoPE base "
        f"{m.rotary_base}, vocab {m.vocab_size}, {'untied' if m.untie_embeddings_and_output_weights else 'tied'} "
        f"embeddings{', q/k layernorm' if m.qk_layernorm else ''}",
    ]
    if m.variant == "resformer":
        lines += ["", "## Value-residual lambdas", "",
                  "V'_n = lambda1 * V_1 + lambda2 * V_n for the layers listed (1-based); other layers are plain "
                  "attention." + (" Values read from the weights." if m.lambda_mode in ("learnable", "learnable_plus") else ""),
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
        for name in RFGPT_FILES:
            shutil.copyfile(HERE / name, folder / name)
    GenerationConfig(bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
                     pad_token_id=special.get("pad"), do_sample=False).save_pretrained(str(folder))


def write_model_files(folder: Path, hf_state, model, special: Dict[str, Optional[int]], dtype: str,
                      shard_bytes: int):
    """The config files and the sharded safetensors of an in-memory HF state dict."""
    from .safetensors_io import save_sharded

    write_config_files(folder, model, special, dtype)
    return save_sharded(hf_state, folder, shard_bytes)


# --------------------------------------------------------------------------------------------------
# Streaming the weights: checkpoint -> HF shards, one layer at a time
# --------------------------------------------------------------------------------------------------
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _meta(shapes):
    return {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in shapes.items()}


def plan_hf_tensors(tensors, model, dtype: torch.dtype):
    """{HF name: (shape, dtype)} of the export and {HF name: Megatron name} of its model-level tensors, from the
    checkpoint metadata alone (the layer mapping runs on meta tensors)."""
    layers = tensors.num_layers()
    if layers != model.num_layers:
        raise ConversionError(f"{tensors.path}: the checkpoint holds {layers} layers, its run config "
                              f"says model.num_layers={model.num_layers}")
    global_shapes = tensors.global_shapes()
    global_names = global_names_to_hf(global_shapes, model)
    shapes = {hf: (global_shapes[name][0], dtype) for name, hf in global_names.items()}
    for i in range(model.num_layers):
        for name, t in layer_to_hf(i, _meta(tensors.layer_shapes(i)), model).items():
            shapes[name] = (t.shape, dtype)
    return shapes, {hf: name for name, hf in global_names.items()}


def hf_tensors(tensors, names, model, from_global: Dict[str, str]):
    """(HF name, tensor) for `names` in their order, from the checkpoint: each layer is read and mapped when its
    first tensor comes up (so an order that keeps a layer's names together reads each layer once)."""
    layer, pending = None, {}
    for name in names:
        match = _HF_LAYER.match(name)
        if match and int(match.group(1)) != layer:
            layer = int(match.group(1))
            pending = layer_to_hf(layer, tensors.read_layer(layer), model)
        yield name, (pending.pop(name) if match else tensors.read(from_global[name]))


def stream_weights(tensors, writer, model, from_global: Dict[str, str], keep=lambda name: False, log=print):
    """Write every planned tensor in the writer's order; returns the tensors `keep` selects (the lambdas, for the
    model card). Logs progress about every 10 s."""
    kept = {}
    begin = last = time.monotonic()
    done_bytes = 0
    for position, (name, tensor) in enumerate(hf_tensors(tensors, writer.order, model, from_global)):
        tensor = tensor.to(writer.shapes[name][1])
        writer.write(name, tensor)
        done_bytes += tensor.numel() * tensor.element_size()
        if keep(name):
            kept[name] = tensor.clone()
        del tensor
        now = time.monotonic()
        if now - last > 10 or position + 1 == len(writer.order):
            last, rate = now, (position + 1) / max(now - begin, 1e-9)
            log(f"  wrote {position + 1}/{len(writer.order)} tensors ({done_bytes / 1e9:.2f} GB) at "
                f"{rate:.1f} tensors/s, {done_bytes / 1e6 / max(now - begin, 1e-9):.0f} MB/s")
    return kept


def verify_weights(folder: Path, tensors, model, from_global: Dict[str, str]) -> int:
    """Read every written tensor back (one at a time) and compare it with the checkpoint's, mapped again; the
    check of a model too large for two copies in memory. Returns the number of tensors checked."""
    from safetensors import safe_open

    from .safetensors_io import INDEX, natural_key

    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    for name, want in hf_tensors(tensors, sorted(weight_map, key=natural_key), model, from_global):
        with safe_open(str(folder / weight_map[name]), framework="pt") as shard:
            got = shard.get_tensor(name)
        if not torch.equal(got, want.to(got.dtype)):
            raise ConversionError(f"verification failed: {name} in {weight_map[name]} differs from the checkpoint")
    return len(weight_map)


def _fresh_tmp(output: Path) -> Path:
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


def verify_folder(folder: Path, model, cfg, dtype: str, seed: int = 0, atol: float = 1e-4) -> float:
    """Max |HF logits - Megatron logits| on random tokens (HF loaded from `folder` in fp32; for a
    bf16 export the Megatron weights are rounded to bf16 first). Raises if above atol."""
    from transformers import AutoModelForCausalLM

    if dtype == "bf16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, min(16, cfg.model.seq_length)), generator=g)
    want = megatron_logits(model, tokens)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=uses_remote_code(cfg.model),
                                              dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        got = hf(tokens).logits.float()
    diff = (got - want).abs().max().item()
    if not diff <= atol:
        raise ConversionError(f"verification failed: HF logits differ from Megatron's by {diff:.3g} (> {atol})")
    return diff


def export(checkpoint, output, dtype: str = "fp32", max_shard_size="5GB", tokenizer: Optional[str] = None,
           verify="auto", force: bool = False, log=print, with_tokenizer: bool = True) -> Path:
    """Write the HF folder of a checkpoint. verify: auto (logits up to LOGITS_CHECK_MAX_BYTES of fp32 weights,
    else weights), logits, weights, none (True / False: auto / none)."""
    from .dist_tensors import DistCheckpointTensors
    from .safetensors_io import StreamingShardWriter, parse_size
    from .tokenizer import check_equivalent, save_hf_tokenizer

    verify = {True: "auto", False: "none"}.get(verify, verify)
    if verify not in VERIFY_MODES:
        raise ConversionError(f"--verify {verify}: choose one of {', '.join(VERIFY_MODES)}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose fp32 or bf16")
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise ConversionError(f"--max-shard-size: {exc}") from None
    output = Path(output).resolve()
    if output.exists() and not force:
        raise ConversionError(f"output {output} exists (pass --force to replace it)")
    it = resolve_checkpoint(checkpoint)
    cfg = read_run_config(it)
    tok_path = find_tokenizer(cfg, tokenizer) if with_tokenizer else None
    train_state = json.loads((it / "train_state.json").read_text())
    check_shard_files(it)
    problem = verify_checkpoint(it)
    if problem:
        raise ConversionError(f"damaged checkpoint: {problem} (manifest.json)")

    tmp = _fresh_tmp(output)
    try:
        tensors = DistCheckpointTensors(it)
        shapes, from_global = plan_hf_tensors(tensors, cfg.model, DTYPES[dtype])
        special = {}
        if tok_path is not None:
            hf_tok, special = save_hf_tokenizer(tok_path, tmp, model_max_length=cfg.model.seq_length)
            check_equivalent(tok_path, hf_tok)
            if len(hf_tok) > cfg.model.vocab_size:
                raise ConversionError(f"tokenizer {tok_path} has {len(hf_tok)} pieces, more than "
                                      f"model.vocab_size={cfg.model.vocab_size}")
        else:
            log("no tokenizer: writing the weights alone (pass --tokenizer PATH to include one)")
        write_config_files(tmp, cfg.model, special, dtype)
        writer = StreamingShardWriter(tmp, shapes, shard_bytes)
        log(f"streaming {len(shapes)} tensors ({sum(s.numel() for s, _ in shapes.values()):,} parameters, {dtype}) "
            f"from {it} into {len(writer.files)} shard(s)")
        lambda_tensors = stream_weights(tensors, writer, cfg.model, from_global,
                                        keep=lambda name: "value_residual" in name, log=log)
        files = writer.close()
        remote = uses_remote_code(cfg.model)
        shutil.copyfile(it / "run_config.yaml", tmp / RUN_CONFIG_COPY)
        shutil.copyfile(it / "train_state.json", tmp / TRAIN_STATE_COPY)
        params = sum(shape.numel() for shape, _ in shapes.values())
        (tmp / "README.md").write_text(model_card(cfg, train_state, params, lambda_table(lambda_tensors, cfg.model),
                                                  remote, dtype, it, tokenizer=tok_path is not None))
        if verify == "auto":
            verify = "logits" if params * 4 <= LOGITS_CHECK_MAX_BYTES else "weights"
        if verify == "logits":
            with megatron_single_process():
                diff = verify_folder(tmp, load_megatron_model(it, cfg), cfg, dtype)
            log(f"verified: max |HF - Megatron| logits = {diff:.2e}")
        elif verify == "weights":
            log(f"verified: {verify_weights(tmp, tensors, cfg.model, from_global)} tensors read back equal the "
                "checkpoint's")
        publish(tmp, output, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {output} ({cfg.model.variant}, {len(files)} safetensors shard(s), {dtype}) from {it}")
    return output
