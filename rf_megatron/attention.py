"""Megatron-Core self-attention with value residual: ResFormer and SVFormer.

Both subclass Megatron's `SelfAttention` and change only what the paper changes: the values that
enter core attention. The mix happens right after the fused QKV projection is split into heads
(before RoPE, which touches only Q and K, and before core attention, so selective recompute of
core attention is unaffected).
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.attention import SelfAttention

from .v1_packing import V1Carrier
from .value_residual import build_lambdas, mix_values


class ValueResidualSelfAttention(SelfAttention):
    """ResFormer attention: layer 1 publishes V_1, layers n >= 2 use lambda1*V_1 + lambda2*V_n. `v1` is the model
    chunk's V1Carrier, handed over by the layer spec (rf_megatron/specs.py)."""

    MIXES = True  # layers >= 2 mix V_1 into their own values (SVFormer replaces them instead)

    def __init__(self, config, submodules, layer_number, *args, rf_config, v1: V1Carrier, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        if config.attention_output_gate:
            raise ValueError("attention_output_gate is not supported with value residual")
        self.v1 = v1
        # a constant per layer, set once: under torch.compile every layer after the first traces the same graph
        # (a branch on layer_number would compile one graph per layer)
        self.publishes_v1 = layer_number == 1
        self.value_lambdas = build_lambdas(rf_config, layer_number) if layer_number > 1 and self.MIXES else None
        if self.value_lambdas is not None:  # one dtype per model: DDP buckets and optimizers group by it
            self.value_lambdas.to(config.params_dtype)

    def _check_split(self, split_qkv: bool) -> None:
        if not split_qkv:
            raise ValueError("value residual needs the split-QKV path: disable apply_rope_fusion "
                             "(the fused single-QKV RoPE kernel never exposes V)")

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        self._check_split(split_qkv)
        query, key, value = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                                output_gate=output_gate, split_qkv=True)
        return query, key, self._value(value)

    def _value(self, value):
        if self.publishes_v1:
            self.v1.value = value
            return value
        if self.value_lambdas is None:  # `sparse`: this layer is plain attention
            return value
        return mix_values(self.v1.value, value, *self.value_lambdas())


def _without_value_rows(linear_builder, kv_size: int):
    """Wrap a QKV linear builder so it allocates only the Q and K rows."""

    def build(input_size, output_size, *args, **kwargs):
        return linear_builder(input_size, output_size - kv_size, *args, **kwargs)

    return build


class SVFormerSelfAttention(ValueResidualSelfAttention):
    """SVFormer attention: layers n >= 2 have no V projection at all and attend over V_1.

    Their fused projection holds, per KV group, `[q (heads/group), k]` rows only, so parameters,
    FLOPs and (with rf_megatron's HF export) the KV cache shrink.
    """

    MIXES = False  # no λ: layers >= 2 take V_1 as their values

    def __init__(self, config, submodules, layer_number, *args, rf_config, **kwargs):
        kv_size = config.kv_channels * config.num_query_groups
        if layer_number > 1:
            submodules = dataclasses.replace(
                submodules, linear_qkv=_without_value_rows(submodules.linear_qkv, kv_size))
        super().__init__(config, submodules, layer_number, *args, rf_config=rf_config, **kwargs)
        if layer_number > 1:
            self.linear_qkv_out_dim -= kv_size

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Layer 1's QKV has V rows, the others do not: Megatron's stacking of all layers' QKV
        into one tensor along a layer axis cannot hold both shapes, so each layer's QKV gets a key
        of its own (`...linear_qkv.weight.layer{n}`)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        own = self.linear_qkv.sharded_state_dict(prefix=f"{prefix}linear_qkv.", sharded_offsets=(), metadata=metadata)
        for suffix in ("weight", "bias"):  # not a fused norm (TE spec): its shape is the same in every layer
            name = f"{prefix}linear_qkv.{suffix}"
            if name in state and name in own:
                own[name].key = f"{own[name].key}.layer{self.layer_number}"
                state[name] = own[name]
        return state

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        self._check_split(split_qkv)
        if self.publishes_v1:
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, True)
        mixed_qk, _ = self.linear_qkv(hidden_states)
        groups, dim = self.num_query_groups_per_partition, self.hidden_size_per_attention_head
        heads_per_group = self.num_attention_heads_per_partition // groups
        # [s, b, g * (hpg + 1) * d] -> [s, b, g, (hpg + 1) * d] -> q [s, b, g*hpg, d], k [s, b, g, d]
        mixed_qk = mixed_qk.view(*mixed_qk.shape[:2], groups, (heads_per_group + 1) * dim)
        query, key = torch.split(mixed_qk, [heads_per_group * dim, dim], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, dim)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, self.v1.value
