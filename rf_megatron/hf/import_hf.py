"""Hugging Face folder (Llama or RFGPT) -> a checkpoint the trainer resumes from, in any layout.

The HF weights are mapped to full Megatron tensors here (one process); `save_worker` then runs under
torchrun with TP x PP processes, builds the target layout, loads its shards of those tensors and
saves them through `rf_megatron.checkpointing.save_checkpoint` as a weights-only checkpoint (step 0, 0 samples
consumed; the trainer starts a fresh optimizer and LR schedule from it). The checkpoint root is written next
to the output and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import yaml

from .folder import RUN_CONFIG_COPY, publish
from .weights import ConversionError, hf_to_megatron, model_config_from_hf

REPO = Path(__file__).resolve().parents[2]


class WorkerError(RuntimeError):
    """The torchrun save workers failed (not a user error)."""


def build_run_config(hf_dir: Path, output: Path, tp: int, pp: int, vpp: Optional[int], overrides: Sequence[str],
                     work: Path):
    """The run config of the new checkpoint: the exporter's copy of the original run config if the
    folder has one (else defaults), the model from config.json, the chosen layout, checkpoint.dir =
    output, the folder's tokenizer.model, then the user's `section.key=value` overrides."""
    from ..config import ConfigError
    from ..run_config import load_run_config

    config_json = hf_dir / "config.json"
    if not config_json.exists():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    model = model_config_from_hf(json.loads(config_json.read_text()))
    base = {}
    if (hf_dir / RUN_CONFIG_COPY).exists():
        base = yaml.safe_load((hf_dir / RUN_CONFIG_COPY).read_text()) or {}
    model_dict = dataclasses.asdict(model)
    if base.get("model", {}).get("seq_length"):
        model_dict["seq_length"] = base["model"]["seq_length"]
    base["model"] = model_dict
    base["name"] = base.get("name") or hf_dir.name
    base["parallel"] = {**(base.get("parallel") or {}), "tensor_parallel": tp, "pipeline_parallel": pp,
                        "virtual_pipeline_parallel": vpp}
    base["checkpoint"] = {**(base.get("checkpoint") or {}), "dir": str(output)}
    if (hf_dir / "tokenizer.model").exists():
        base["data"] = {**(base.get("data") or {}), "tokenizer_model": str(output / "tokenizer.model")}
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


def run_workers(world: int, weights: Path, run_config: Path, root: Path, timeout: Optional[float] = None,
                ports: Optional[range] = None) -> None:
    from ..ports import free_port

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["RF_MEGATRON_CPU"] = "1"  # conversion runs on the CPU by design (rf_megatron.hf.export.megatron_single_process)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={free_port(ports)}", "-m", "rf_megatron.hf.save_worker", "--weights", str(weights),
           "--run-config", str(run_config), "--root", str(root)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise WorkerError(f"the {world} save workers failed (exit {proc.returncode}):\n{tail}")


def import_hf(hf_dir, output, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, overrides: Sequence[str] = (),
              force: bool = False, log=print, ports: Optional[range] = None) -> Path:
    """ports: where the save workers' rendezvous port may come from (default: any free port)."""
    from ..run_config import save_yaml
    from .safetensors_io import load_hf_weights

    hf_dir, output = Path(hf_dir).resolve(), Path(output).resolve()
    if not hf_dir.is_dir():
        raise ConversionError(f"--hf {hf_dir}: no such directory")
    if output.exists() and not force:
        raise ConversionError(f"output {output} exists (pass --force to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.work-", dir=output.parent))
    root = output.parent / f".{output.name}.tmp-{os.getpid()}"
    try:
        cfg = build_run_config(hf_dir, output, tp, pp, vpp, overrides, work)
        try:
            hf = load_hf_weights(hf_dir)
        except FileNotFoundError as exc:
            raise ConversionError(str(exc)) from None
        full = hf_to_megatron({k: v.float() for k, v in hf.items()}, cfg.model)
        torch.save(full, work / "weights.pt")
        save_yaml(cfg, work / "run_config.yaml")
        if root.exists():
            shutil.rmtree(root)
        world = tp * pp * cfg.parallel.context_parallel
        log(f"saving {cfg.model.variant} as TP{tp} x PP{pp}" + (f" x VPP{vpp}" if vpp else "")
            + f" with {world} processes ...")
        run_workers(world, work / "weights.pt", work / "run_config.yaml", root, ports=ports)
        if (hf_dir / "tokenizer.model").exists():
            shutil.copyfile(hf_dir / "tokenizer.model", root / "tokenizer.model")
        publish(root, output, force)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {output} (iter_0000000, step 0): resume with "
        f"pretrain/pretrain_resformer.py --config {output}/iter_0000000/run_config.yaml data.paths=[...]")
    return output


def overrides_from_argv(values: List[str]) -> List[str]:
    bad = [v for v in values if "=" not in v]
    if bad:
        raise ConversionError(f"override {bad[0]!r}: expected section.key=value")
    return values
