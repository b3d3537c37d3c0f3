"""Hugging Face folder (Llama or RFGPT) -> a checkpoint the trainer resumes from, in any layout, streamed.

One CPU process, memory flat in depth: the HF safetensors are read one layer at a time (`HFWeights`), mapped to
Megatron tensors by the weight map inverted (`weights.layer_from_hf`) and written straight into Megatron's
torch_dist format (`streaming_save`: Megatron's keys and chunks from a meta-device model, the data made tensor by
tensor). The result is a weights-only checkpoint (step 0, 0 samples consumed; no optimizer state: the trainer
starts a fresh optimizer and LR schedule from it, Megatron-LM's --finetune) whose run config holds the chosen
TP / PP / virtual-PP layout; Megatron reshards the TP1 x PP1 chunks into it on load. Names and shapes are checked
against the model before anything is written; the checkpoint root is written next to the output and renamed
when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import yaml

from .folder import RUN_CONFIG_COPY, fresh_tmp, publish, remove_leftovers
from .safetensors_io import HFWeights
from .weights import ConversionError, global_rules, hf_to_megatron, layer_from_hf, model_config_from_hf


def build_run_config(hf_dir: Path, output: Path, tp: int, pp: int, vpp: Optional[int], overrides: Sequence[str],
                     work: Path):
    """The run config of the new checkpoint: the exporter's copy of the original run config if the
    folder has one (else defaults), the model from config.json, the chosen layout, checkpoint.dir =
    output (logging.dir beside it), the folder's tokenizer.model, then the user's `section.key=value` overrides."""
    from ..config import ConfigError
    from ..run_config import load_run_config

    config_json = hf_dir / "config.json"
    if not config_json.exists():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    try:
        hf_config = json.loads(config_json.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{config_json}: not valid JSON ({exc})") from None
    model = model_config_from_hf(hf_config)
    base = {}
    if (hf_dir / RUN_CONFIG_COPY).exists():
        base = yaml.safe_load((hf_dir / RUN_CONFIG_COPY).read_text()) or {}
    model_dict = dataclasses.asdict(model)
    for key in ("seq_length", "init"):  # the source run's, where config.json does not say
        if base.get("model", {}).get(key):
            model_dict[key] = base["model"][key]
    base["model"] = model_dict
    base["name"] = base.get("name") or hf_dir.name
    base["parallel"] = {**(base.get("parallel") or {}), "tensor_parallel": tp, "pipeline_parallel": pp,
                        "virtual_pipeline_parallel": vpp}
    base["checkpoint"] = {**(base.get("checkpoint") or {}), "dir": str(output)}
    # the new run's own folder, not the source run's: beside its checkpoints (runs/y for runs/y/checkpoints)
    base["logging"] = {**(base.get("logging") or {}),
                       "dir": str(output.parent if output.name == "checkpoints" else output / "logs")}
    # the folder's tokenizer, never a path of the source run's (which another machine may not have, or hold another)
    has_tokenizer = (hf_dir / "tokenizer.model").exists()
    base["data"] = {**(base.get("data") or {}),
                    "tokenizer_model": str(output / "tokenizer.model") if has_tokenizer else None}
    draft = work / "base.yaml"
    draft.write_text(yaml.safe_dump(base, sort_keys=False))
    try:
        cfg = load_run_config(str(draft), list(overrides))
        cfg.parallel.validate(tp * pp * cfg.parallel.context_parallel)
        cfg.model.validate(cfg.parallel)
        cfg.optim.validate()
    except ConfigError as exc:
        raise ConversionError(str(exc)) from None
    return cfg


class MegatronTensorsFromHF:
    """The model's full (TP1) Megatron tensors by global name, mapped from an HF folder one layer at a time. The
    mapping runs once on meta tensors first, which checks every name and shape without reading a weight."""

    def __init__(self, weights: HFWeights, model):
        self.weights, self.model = weights, model
        self.shapes = {name: t.shape for name, t in hf_to_megatron(weights.meta(), model).items()}
        self.from_global = global_rules(model)
        self.layer, self.cached = None, {}

    def tensor(self, name: str) -> torch.Tensor:
        if not name.startswith("decoder.layers."):
            return self.weights[self.from_global[name]]
        layer, inside = name[len("decoder.layers."):].split(".", 1)
        if int(layer) != self.layer:  # a writer asks for a layer's tensors together: map each layer once
            self.cached = {}  # drop the last layer before mapping the next: one layer in memory, not two
            self.cached, self.layer = layer_from_hf(int(layer), self.weights.__getitem__, self.model), int(layer)
        return self.cached[inside]


def verify_import(iter_dir: Path, weights: HFWeights, model) -> int:
    """Read every written tensor back, mapped to HF names by the export's own path (one layer at a time), and
    compare it with the HF tensor it was made from, in the checkpoint's dtype. Returns the number checked."""
    from .dist_tensors import DistCheckpointTensors
    from .export import hf_tensors
    from .safetensors_io import natural_key
    from .weights import global_names_to_hf

    tensors = DistCheckpointTensors(iter_dir)
    from_global = {hf: name for name, hf in global_names_to_hf(tensors.global_shapes(), model).items()}
    tied = not model.untie_embeddings_and_output_weights
    names = [n for n in sorted(weights.shapes, key=natural_key) if not (tied and n == "lm_head.weight")]
    for name, got in hf_tensors(tensors, names, model, from_global):
        if not torch.equal(got, weights[name].to(got.dtype)):
            raise ConversionError(f"verification failed: {name} reads back from {iter_dir} different from the HF "
                                  "weights")
    return len(names)


def import_hf(hf_dir, output, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, overrides: Sequence[str] = (),
              force: bool = False, verify: bool = True, log=print) -> Path:
    """verify: read every written tensor back against the HF weights (`verify_import`, one layer at a time)."""
    import time

    from ..checkpointing import save_checkpoint
    from ..run_config import to_dict
    from .source_checkpoint import megatron_single_process
    from .streaming_save import StreamingSaveStrategy, build_meta_model

    hf_dir, output = Path(hf_dir).resolve(), Path(output).resolve()
    if not hf_dir.is_dir():
        raise ConversionError(f"--hf {hf_dir}: no such directory")
    remove_leftovers(output, log)  # before the exists check: it may put an output back
    if output.exists() and not force:
        raise ConversionError(f"output {output} exists (pass --force to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    root = fresh_tmp(output, log)  # the checkpoint root, renamed into place when complete
    work = output.parent / f".{output.name}.work-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        cfg = build_run_config(hf_dir, output, tp, pp, vpp, overrides, work)
        try:
            source = MegatronTensorsFromHF(HFWeights(hf_dir), cfg.model)
        except FileNotFoundError as exc:
            raise ConversionError(str(exc)) from None
        begin = time.monotonic()
        log(f"writing {cfg.model.variant} for TP{tp} x PP{pp}"
            + (f" x VPP{vpp}" if vpp else "") + " ...")
        with megatron_single_process():
            save_checkpoint(root, 0, [build_meta_model(cfg.model, cfg.parallel.params_dtype)], None, None,
                            {"consumed_samples": 0}, yaml.safe_dump(to_dict(cfg), sort_keys=False), keep_last=0,
                            sharded_strategy=StreamingSaveStrategy(source, log))
        if verify:
            checked = verify_import(root / "iter_0000000", source.weights, cfg.model)
            log(f"verified: {checked} tensors read back equal the HF weights")
        if (hf_dir / "tokenizer.model").exists():
            shutil.copyfile(hf_dir / "tokenizer.model", root / "tokenizer.model")
        publish(root, output, force)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not (hf_dir / "tokenizer.model").exists():
        log(f"warning: {hf_dir} has no tokenizer.model, so the run config names "
            + (f"data.tokenizer_model={cfg.data.tokenizer_model} (yours)" if cfg.data.tokenizer_model else
               "no tokenizer: pass data.tokenizer_model=... (the model's own tokenizer) when you train on"))
    world = tp * pp * cfg.parallel.context_parallel  # the fewest processes that hold this layout
    launch = "python" if world == 1 else f"python -m rf_megatron.launch --nproc-per-node {world}"
    log(f"wrote {output} (iter_0000000, step 0) in {time.monotonic() - begin:.0f} s: resume with {launch} "
        f"pretrain/pretrain_resformer.py --config {output}/iter_0000000/run_config.yaml data.paths=[...]")
    return output


def overrides_from_argv(values: List[str]) -> List[str]:
    bad = [v for v in values if "=" not in v]
    if bad:
        raise ConversionError(f"override {bad[0]!r}: expected section.key=value")
    return values
