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

import json
import re
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from ..checkpoint_dir import read_train_state, verify_checkpoint
from .folder import (DTYPES, RUN_CONFIG_COPY, TRAIN_STATE_COPY, fresh_tmp, model_card, publish,  # noqa: F401
                     remove_leftovers, write_config_files, write_model_files)
from .source_checkpoint import (check_shard_files, find_tokenizer, load_megatron_model, megatron_logits,  # noqa: F401
                                megatron_single_process, megatron_state, read_run_config, resolve_checkpoint)
from .weights import ConversionError, global_names_to_hf, lambda_table, layer_to_hf, uses_remote_code
VERIFY_MODES = ("auto", "logits", "weights", "none")
LOGITS_CHECK_MAX_BYTES = 4 * 10**9  # --verify auto: the logits check holds both models (~3x the fp32 weights)


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
    remove_leftovers(output, log)  # before the exists check: it may put an output back
    if output.exists() and not force:
        raise ConversionError(f"output {output} exists (pass --force to replace it)")
    it = resolve_checkpoint(checkpoint)
    cfg = read_run_config(it)
    tok_path = find_tokenizer(cfg, tokenizer) if with_tokenizer else None
    train_state = read_train_state(it)
    check_shard_files(it)
    problem = verify_checkpoint(it)
    if problem:
        raise ConversionError(f"damaged checkpoint: {problem} (manifest.json)")

    tmp = fresh_tmp(output, log)
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
