"""Training data: Megatron's GPTDataset over one or more blended indexed datasets, with
train/valid/test splits, and iterators whose position (consumed samples) is checkpointed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from .config import ConfigError
from .console import is_rank0


def _is_weight(item) -> bool:
    try:
        float(item)
        return True
    except (TypeError, ValueError):
        return False


def blend_prefixes(paths: List[str]) -> List[str]:
    """The dataset prefixes of a data option: blend lists alternate weight and prefix (["0.3", "a", "0.7", "b"]);
    plain lists are prefixes. A list that is neither is a ConfigError (Megatron would assert deep inside)."""
    if not paths or not _is_weight(paths[0]):
        if any(_is_weight(p) for p in paths):
            raise ConfigError(f"data paths {list(paths)}: a weight among plain prefixes; a blend alternates weight "
                              "and prefix: [0.7, a_text_document, 0.3, b_text_document]")
        return list(paths)
    weights, prefixes = paths[0::2], paths[1::2]
    if len(paths) % 2 or not all(_is_weight(w) for w in weights) or any(_is_weight(p) for p in prefixes):
        raise ConfigError(f"data paths {list(paths)}: a blend alternates weight and prefix, one weight per prefix: "
                          "[0.7, a_text_document, 0.3, b_text_document]")
    if any(float(w) < 0 for w in weights) or not sum(float(w) for w in weights) > 0:
        raise ConfigError(f"data paths {list(paths)}: blend weights must be >= 0 and not all 0")
    return list(prefixes)


def check_data(paths: List[str], vocab_size: int, tokenizer) -> None:
    """Fail early, with the file named, on missing/corrupt data or a vocab that is too small."""
    from .indexed_data import TOKENIZER_RECORD, DataError, max_token_id, tokenized_with, verify_indexed_dataset
    from .vocab import check_vocab_size

    check_vocab_size(vocab_size, tokenizer.vocab_size, tokenizer.model_path)
    for prefix in blend_prefixes(paths):
        try:
            verify_indexed_dataset(prefix)
            top = max_token_id(prefix)
            record = tokenized_with(prefix, tokenizer)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        if record == "unknown" and is_rank0():
            print(f"warning: {prefix} has no {prefix.rsplit('/', 1)[-1]}{TOKENIZER_RECORD} (tools/preprocess_data.py "
                  f"writes one): cannot check it was tokenized with {tokenizer.model_path}", flush=True)
        if top >= vocab_size:
            raise ConfigError(f"{prefix}.bin holds token id {top} >= model.vocab_size={vocab_size}")


def check_splits(paths: List[str], split: str, seq_length: int, training: bool = True) -> None:
    """Every non-empty split of every dataset must hold at least one sample (seq_length + 1 tokens): Megatron
    loops forever on an empty one (GPTDataset._get_num_epochs) and fails late on a too-small one. `training`:
    data.paths with data.split (else a held-out file with its own split)."""
    from .indexed_data import split_token_counts

    weights = split_weights(split)
    if len(weights) != 3 or sum(weights) <= 0 or (training and weights[0] <= 0):
        raise ConfigError(f"data.split={split!r}: give three weights train,valid,test (>= 0, train > 0), e.g. 98,2,0")
    need = seq_length + 1
    for prefix in blend_prefixes(paths):
        counts = split_token_counts(prefix, weights)
        total_docs = sum(d for d, _ in counts)
        for name, weight, (docs, tokens) in zip(("training", "validation", "test"), weights, counts):
            if weight > 0 and tokens < need:
                fix = ("more documents (tools/preprocess_data.py makes one per JSONL line, or per paragraph with "
                       "--split-text-on-blank-lines)")
                other = "another data.split" + (", or none (data.split=100,0,0 trains without validation)"
                                                 if name == "validation" else "")
                raise ConfigError(f"{prefix}: data.split={split} gives the {name} split {docs} of its {total_docs} "
                                  f"document(s), {tokens} tokens: less than one sample of seq_length + 1 = {need} "
                                  f"tokens. Use {fix}, or {other}")


def build_datasets(paths: List[str], split: str, seq_length: int, tokenizer, seed: int,
                   num_samples: List, cache_dir=None, only_split: Optional[int] = None):
    """[train, valid, test] GPTDatasets (None where a split is empty). `only_split` (0, 1 or 2): build that split
    alone, over the documents `split` gives it."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=get_blend_from_list(paths), split=split,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=str(cache_dir) if cache_dir else None,
    )
    if only_split is not None:
        config.split_matrix = [m if i == only_split else None for i, m in enumerate(config.split_matrix)]
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()


def load_tokenizer(cfg):
    """The run's SentencePiece tokenizer, with the data checked against it (a ConfigError if not)."""
    from .tokenizer import SentencePieceTokenizer, TokenizerError

    try:
        tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
    except TokenizerError as exc:
        raise ConfigError(str(exc)) from None
    for paths in (cfg.data.paths, cfg.data.valid_paths, cfg.data.test_paths):
        if paths:
            check_data(paths, cfg.model.vocab_size, tokenizer)
    return tokenizer


VALID_SEED = 20241023  # the held-out sets' order is a property of the data, not of the run's seed
HELD_OUT = {1: ("validation", "valid_paths"), 2: ("test", "test_paths")}  # split index -> (name, data option)


def split_weights(split: str) -> List[float]:
    """data.split as three weights (train, valid, test)."""
    import re

    weights = [float(w) for w in re.findall(r"[.0-9]+", str(split))]  # Megatron's parse_and_normalize_split
    return weights + [0.0] * (3 - len(weights))


def check_held_out_sources(data) -> None:
    """A held-out set comes from data.split's share of data.paths or from files of its own, not both."""
    weights = split_weights(data.split)
    for index, (name, option) in HELD_OUT.items():
        if getattr(data, option) and weights[index] > 0:
            fixed = ",".join(f"{w:g}" if i != index else "0" for i, w in enumerate(weights))
            raise ConfigError(f"data.split={data.split} gives part of data.paths to {name} and data.{option} is set "
                              f"too: use data.split={fixed} with data.{option}")


def held_out_is_weighted(data, index: int) -> bool:
    """Whether the validation (index 1) or test (2) set is a weighted blend: built to the size of one evaluation
    (eval_steps global batches), with no whole to score."""
    paths = getattr(data, HELD_OUT[index][1]) or data.paths
    return blend_prefixes(paths) != list(paths)


def build_run_datasets(cfg, tokenizer, skip_batches: int = 0):
    """(train, valid, test) GPTDatasets, the same samples in the same order for both trainers.

    Training data is sized for the whole run and shuffled by train.seed. Each held-out set (data.split's share of
    data.paths, or data.valid_paths / data.test_paths) is built on its own with a fixed seed: the same samples in
    the same order whatever train.seed, eval_interval or the layout, one epoch (no wrap) for an unweighted set.
    None: no such set (data.split gives it nothing and no paths are set). `skip_batches`: global batches a
    rewind skips (checkpoint.rewind_to_healthy), on top of the run's own."""
    t, d = cfg.train, cfg.data
    check_splits(d.paths, d.split, cfg.model.seq_length)
    weights = split_weights(d.split)
    train, _, _ = build_datasets(d.paths, d.split, cfg.model.seq_length, tokenizer, t.seed,
                                 [(t.train_steps + skip_batches) * t.global_batch_size, 0, 0], d.cache_dir)
    if train is None:
        raise ConfigError(f"data.split={d.split!r} leaves no training data")
    valid, test = (_build_held_out(cfg, tokenizer, weights, index) for index in HELD_OUT)
    if valid is None and t.eval_only:
        raise ConfigError(f"train.eval_only=true but data.split={d.split} leaves no validation set (set "
                          "data.valid_paths, or give data.split a validation share)")
    if valid is None and is_rank0():
        print(f"note: data.split={d.split} has no validation split: training without evaluation", flush=True)
    return train, valid, test


def _build_held_out(cfg, tokenizer, weights, index: int):
    """The validation (index 1) or test (index 2) set."""
    d, t = cfg.data, cfg.train
    name, option = HELD_OUT[index]
    own_paths = getattr(d, option)
    if own_paths:
        paths, split = own_paths, ",".join("100" if i == index else "0" for i in range(3))  # the whole files
        check_splits(paths, split, cfg.model.seq_length, training=False)
    elif weights[index] > 0:
        paths, split = d.paths, d.split
    else:
        return None
    weighted = held_out_is_weighted(d, index)
    if weighted and t.eval_full:
        raise ConfigError(f"train.eval_full needs an unweighted {name} set (a weighted blend has no whole to "
                          f"score): list the data.{option} prefixes without weights")
    # unweighted: exactly one epoch; a weighted blend needs a size: what one evaluation reads
    size = t.eval_steps * t.global_batch_size if weighted else None
    sizes = [size if i == index else 0 for i in range(3)]
    return build_datasets(paths, split, cfg.model.seq_length, tokenizer, VALID_SEED, sizes, d.cache_dir,
                          only_split=index)[index]


def causal_mask(seq_length: int) -> torch.Tensor:
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool).triu(1)


class MicrobatchStream:
    """Deterministic, resumable batches: global batch k holds samples [k*G, (k+1)*G) of the
    dataset (it shuffles itself); DP rank r takes its contiguous slice, split into microbatches."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, consumed_samples: int = 0,
                 dp_rank: Optional[int] = None, dp_size: Optional[int] = None, limit: Optional[int] = None):
        """`limit`: samples from this index on are padding (loss mask 0), so a last partial batch scores
        each sample once (validation)."""
        if dp_rank is None:  # Megatron's data-parallel group (the DeepSpeed trainer passes its own)
            from megatron.core import parallel_state

            dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.consumed_samples, self.limit = consumed_samples, limit
        self.dp_rank = dp_rank
        self.per_rank = global_batch // dp_size
        self.num_microbatches = self.per_rank // micro_batch

    def next_global_batch(self) -> List[Dict[str, torch.Tensor]]:
        start = self.consumed_samples + self.dp_rank * self.per_rank
        self.consumed_samples += self.global_batch
        indices = [start + i for i in range(self.per_rank)]
        return [self._collate(indices[i:i + self.micro_batch]) for i in range(0, self.per_rank, self.micro_batch)]

    def _collate(self, indices) -> Dict[str, torch.Tensor]:
        samples = [self.dataset[i % len(self.dataset)] for i in indices]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        if self.limit is not None:
            keep = torch.tensor([i < self.limit for i in indices], dtype=batch["loss_mask"].dtype)
            batch["loss_mask"] = batch["loss_mask"] * keep[:, None]
        batch["attention_mask"] = causal_mask(batch["tokens"].shape[1])
        return batch


def chunk_iterators(microbatches: List[Dict[str, torch.Tensor]], num_chunks: int):
    """One iterator per virtual pipeline chunk over the same microbatches (each chunk reads all)."""
    its: List[Iterator] = [iter(microbatches) for _ in range(num_chunks)]
    return its if num_chunks > 1 else its[0]
