"""Evaluate an exported Hugging Face folder: lm-evaluation-harness tasks and held-out perplexity.

The folder is what tools/convert_checkpoint_to_hf.py writes: vanilla as a native Llama, resformer and
svformer as RFGPT (remote code, so the harness must pass `trust_remote_code`). The harness runs its `hf`
backend on it unchanged, so a score here is the score any lm-eval user gets from the same folder; this
module only picks the right flags, refuses bad input in one line, and writes the JSON next to the model.
Perplexity is ours: non-overlapping windows of the model's context over a Megatron indexed dataset (one
split of it, cut as training cut it) or a text/JSONL file.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import torch

from ..indexed_data import DataError, dataset_prefix, iter_documents, split_tokens


class EvaluationError(ValueError):
    """A user mistake (missing folder, unknown task, empty data): reported as one line, exit 2."""


SPLIT_PARTS = ("train", "valid", "test")


def check_folder(folder) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise EvaluationError(f"{folder}: not a Hugging Face model folder (no config.json); make one with "
                              "tools/convert_checkpoint_to_hf.py")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise EvaluationError(f"{folder}: has no tokenizer (exported with --no-tokenizer?); export again with "
                              "--tokenizer MODEL")
    return folder


def needs_remote_code(folder: Path) -> bool:
    """RFGPT folders carry their modeling code; a vanilla (Llama) folder does not need it."""
    return (folder / "modeling_rfgpt.py").is_file()


def load_model(folder: Path, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per step of ours instead

    remote = needs_remote_code(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote,
                                                 dtype=getattr(torch, dtype)).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), trust_remote_code=remote)


# ------------------------------------------------------------------------------------ the harness
def run_harness(folder, tasks: Sequence[str], out_dir, *, include_path=None, batch_size="auto",
                num_fewshot: Optional[int] = None, limit: Optional[float] = None, dtype: str = "float32",
                device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """lm-evaluation-harness's `hf` backend on `folder`; writes OUT/results.json and OUT/samples_TASK.jsonl
    (every request with the model's loglikelihoods) and returns the results dict."""
    folder = check_folder(folder)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvaluationError("lm-evaluation-harness is not installed: pip install 'rf-megatron[eval]'") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise EvaluationError(f"--include-path {include_path}: not a directory of task YAML files")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvaluationError(f"unknown task(s) {', '.join(unknown)}: see `lm_eval ls tasks`, or pass "
                              "--include-path DIR for your own task YAML files")
    model_args = {"pretrained": str(folder), "trust_remote_code": needs_remote_code(folder), "dtype": dtype}
    log(f"lm-eval {getattr(lm_eval, '__version__', '?')}: {', '.join(tasks)} on {folder} "
        f"(batch size {batch_size}, {device}, {dtype})")
    begin = time.perf_counter()
    results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks), device=device,
                                      batch_size=batch_size, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", {}) or {}
    for task, rows in samples.items():
        with open(out_dir / f"samples_{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    for task, metrics in results.get("results", {}).items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        log(f"  {task}: {shown}")
    log(f"wrote {out_dir / 'results.json'} in {time.perf_counter() - begin:.1f} s")
    return results


# ---------------------------------------------------------------------------------- perplexity
def indexed_prefix(source, split: Optional[Sequence[float]] = None) -> Optional[str]:
    """The indexed dataset's prefix (PREFIX, PREFIX.bin or PREFIX.idx given), or None for a text/JSONL file;
    checked before any model is loaded, so a wrong path fails in a second."""
    source = str(source)
    stem = dataset_prefix(source)
    if Path(stem + ".idx").is_file() or Path(stem + ".bin").is_file():
        return stem
    if not Path(source).is_file():
        raise EvaluationError(f"{source}: no such file, and no indexed dataset {source}.bin/.idx")
    if split:
        raise EvaluationError("--split applies to indexed datasets; a text file is scored whole")
    return None


def training_split(folder, stem: str) -> Optional[str]:
    """The data.split this model trained with, where the indexed dataset `stem` is one it trained on (the run
    config the export copied into the folder names them); None otherwise. Scored whole, that dataset is mostly
    documents the model has seen."""
    import yaml

    from .folder import RUN_CONFIG_COPY

    try:
        data = (yaml.safe_load((Path(folder) / RUN_CONFIG_COPY).read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError):
        return None
    for path in map(str, data.get("paths") or []):
        try:
            if os.path.samefile(stem + ".idx", dataset_prefix(path) + ".idx"):
                return str(data.get("split"))
        except OSError:  # a weight of a blend, or a dataset not on this machine
            continue
    return None


def tokens_of(source, tokenizer, split: Optional[Sequence[float]] = None, part: str = "valid"):
    """(token ids to score, UTF-8 bytes they encode or None): a Megatron indexed dataset (`split` picks the
    documents training held out, e.g. 949,50,1 and part=valid; no bytes), or a JSONL/text file tokenized by the
    folder's tokenizer (its bytes give bits/byte)."""
    stem = indexed_prefix(source, split)
    if stem is not None:
        try:
            return np.asarray(split_tokens(stem, split or (1,), SPLIT_PARTS.index(part) if split else 0)), None
        except DataError as exc:
            raise EvaluationError(str(exc)) from None
    ids: List[int] = []
    n_bytes, eos = 0, tokenizer.eos_token_id
    try:
        for text, _ in iter_documents(str(source)):
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            n_bytes += len(text.encode("utf-8"))
            if eos is not None:
                ids.append(eos)
    except DataError as exc:
        raise EvaluationError(str(exc)) from None
    return np.asarray(ids, dtype=np.int64), n_bytes


def windows(n_tokens: int, length: int) -> Iterable[tuple]:
    """[begin, end) of non-overlapping windows; every token but the first of a window is scored once."""
    for begin in range(0, max(n_tokens - 1, 0), length):
        end = min(begin + length, n_tokens)
        if end - begin >= 2:
            yield begin, end


@torch.no_grad()
def perplexity(model, ids: np.ndarray, *, seq_length: int, batch_size: int = 8, max_tokens: Optional[int] = None,
               log: Callable[[str], None] = print) -> dict:
    """Mean next-token negative log-likelihood (nats) over `ids`, in windows of `seq_length` tokens."""
    if max_tokens:
        ids = ids[:max_tokens]
    spans = list(windows(len(ids), seq_length))
    if not spans:
        raise EvaluationError(f"nothing to score: {len(ids)} tokens (need at least 2)")
    device = next(model.parameters()).device
    nll, scored, begin, last = 0.0, 0, time.perf_counter(), time.perf_counter()
    for first in range(0, len(spans), batch_size):
        batch = spans[first:first + batch_size]
        width = max(e - b for b, e in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (b, e) in enumerate(batch):
            x[row, :e - b] = torch.from_numpy(np.asarray(ids[b:e], dtype=np.int64))
            mask[row, :e - b] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, x[:, 1:].unsqueeze(-1).to(device)).squeeze(-1)
        keep = mask[:, 1:].to(device).bool()
        nll -= float(logp[keep].sum())
        scored += int(keep.sum())
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            log(f"  {scored:,} tokens scored, {scored / (last - begin):,.0f} tokens/s")
    loss = nll / scored
    return {"tokens": scored, "nll_sum": nll, "loss": loss, "perplexity": math.exp(loss),
            "windows": len(spans), "seq_length": seq_length}
