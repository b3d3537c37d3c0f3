"""Training data: Megatron's GPTDataset over one or more blended indexed datasets, with
train/valid/test splits, and iterators whose position (consumed samples) is checkpointed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from .config import ConfigError


def _prefixes(paths: List[str]) -> List[str]:
    """Blend lists alternate weight and prefix: ["0.3", "a", "0.7", "b"]; plain lists are prefixes."""
    try:
        float(paths[0])
        return paths[1::2]
    except ValueError:
        return list(paths)


def check_data(paths: List[str], vocab_size: int, tokenizer) -> None:
    """Fail early, with the file named, on missing/corrupt data or a vocab that is too small."""
    from .indexed_data import DataError, max_token_id, verify_indexed_dataset

    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, {tokenizer.model_path})")
    for prefix in _prefixes(paths):
        try:
            verify_indexed_dataset(prefix)
            top = max_token_id(prefix)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        if top >= vocab_size:
            raise ConfigError(f"{prefix}.bin holds token id {top} >= model.vocab_size={vocab_size}")


def build_datasets(paths: List[str], split: str, seq_length: int, tokenizer, seed: int,
                   num_samples: List[int], cache_dir=None):
    """[train, valid, test] GPTDatasets (None where a split is empty)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=get_blend_from_list(paths), split=split,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=str(cache_dir) if cache_dir else None,
    )
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
    check_data(cfg.data.paths, cfg.model.vocab_size, tokenizer)
    return tokenizer


def build_train_valid(cfg, tokenizer):
    """(train, valid) GPTDatasets sized for the whole run (every evaluation included); the same
    samples in the same order for both trainers."""
    t = cfg.train
    evals = t.train_steps // t.eval_interval + 2 if t.eval_interval else 2
    train, valid, _ = build_datasets(
        cfg.data.paths, cfg.data.split, cfg.model.seq_length, tokenizer, t.seed,
        [t.train_steps * t.global_batch_size, evals * t.eval_steps * t.global_batch_size, 0], cfg.data.cache_dir)
    if train is None:
        raise ConfigError(f"data.split={cfg.data.split!r} leaves no training data")
    return train, valid


def causal_mask(seq_length: int) -> torch.Tensor:
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool).triu(1)


class MicrobatchStream:
    """Deterministic, resumable batches: global batch k holds samples [k*G, (k+1)*G) of the
    dataset (it shuffles itself); DP rank r takes its contiguous slice, split into microbatches."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, consumed_samples: int = 0,
                 dp_rank: Optional[int] = None, dp_size: Optional[int] = None):
        if dp_rank is None:  # Megatron's data-parallel group (the DeepSpeed trainer passes its own)
            from megatron.core import parallel_state

            dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.consumed_samples = consumed_samples
        self.dp_rank = dp_rank
        self.per_rank = global_batch // dp_size
        self.num_microbatches = self.per_rank // micro_batch

    def next_global_batch(self) -> List[Dict[str, torch.Tensor]]:
        start = self.consumed_samples + self.dp_rank * self.per_rank
        self.consumed_samples += self.global_batch
        indices = [(start + i) % len(self.dataset) for i in range(self.per_rank)]
        return [self._collate(indices[i:i + self.micro_batch]) for i in range(0, self.per_rank, self.micro_batch)]

    def _collate(self, indices) -> Dict[str, torch.Tensor]:
        samples = [self.dataset[i] for i in indices]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        batch["attention_mask"] = causal_mask(batch["tokens"].shape[1])
        return batch


def chunk_iterators(microbatches: List[Dict[str, torch.Tensor]], num_chunks: int):
    """One iterator per virtual pipeline chunk over the same microbatches (each chunk reads all)."""
    its: List[Iterator] = [iter(microbatches) for _ in range(num_chunks)]
    return its if num_chunks > 1 else its[0]
