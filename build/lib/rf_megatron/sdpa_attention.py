"""Megatron core attention on `torch.nn.functional.scaled_dot_product_attention`.

Megatron's local `DotProductAttention` materialises the `[b, heads, s, s]` scores and runs an unfused
softmax; Transformer Engine's attention is the only fused one Megatron ships. This subclass keeps
everything Megatron's class decides (heads per TP partition, softmax scale incl.
`apply_query_key_layer_scaling`, the dropout module and its RNG tracker, the sharded state dict) and
replaces only the computation by PyTorch's SDPA, which picks a flash / cuDNN / memory-efficient kernel
on a GPU and a fused one on the CPU. Same inputs and output as `DotProductAttention`:
q `[sq, b, heads_per_partition, d]`, k/v `[sk, b, groups_per_partition, d]` ->
`[sq, b, heads_per_partition * d]` (the full sequence on every TP rank, also under sequence parallel).

The causal mask type is applied as `is_causal`, and the attention mask tensor is then not read, as
Megatron's fused paths (its fused causal softmax, Transformer Engine) do not read it either; the
trainer's batches carry the plain causal mask (rf_megatron/data.py). Other mask types pass the mask
on (Megatron's convention: True = masked out).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

HALF = (torch.float16, torch.bfloat16)


class SDPADotProductAttention(DotProductAttention):
    """`DotProductAttention` computed by `scaled_dot_product_attention` (no `[s, s]` scores kept)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        if self.config.softmax_type != "vanilla" or self.scale_mask_softmax.window_size is not None:
            raise ValueError("attention_backend=sdpa supports the vanilla softmax without a sliding window "
                             "(use attention_backend=unfused)")
        # Megatron divides softmax_scale by the layer number and multiplies the scores by it again inside
        # the softmax (fp16 range): the product is what the softmax sees
        layer_scaling = self.layer_number if self.config.apply_query_key_layer_scaling else 1
        self.sdpa_scale = self.softmax_scale * layer_scaling
        self.heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("attention_backend=sdpa supports neither packed sequences nor an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if causal and query.size(0) != key.size(0):
            raise ValueError("attention_backend=sdpa: causal attention needs as many queries as keys")
        # [s, b, n, d] -> [b, n, s, d] (a view: SDPA's kernels take strided inputs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = {}
        if self.heads_per_group > 1:
            if q.is_cuda and q.dtype in HALF:  # flash takes the groups as they are
                gqa = {"enable_gqa": True}
            else:  # other kernels: repeat K/V per head, as DotProductAttention does
                k = k.repeat_interleave(self.heads_per_group, dim=1)
                v = v.repeat_interleave(self.heads_per_group, dim=1)
        mask = None if causal or attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                  scale=self.sdpa_scale, **gqa)

        if dropout > 0 and not self.config.sequence_parallel:  # DotProductAttention's RNG stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, n, sq, d] -> [sq, b, n * d]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(*context.shape[:2], self.hidden_size_per_partition)
