"""Layer specs: Megatron-Core's own GPT layer specs with our attention and layer swapped in.

- `local`: Megatron-Core modules only (runs on CPU); every norm replaced by an SP-capable one.
- `transformer_engine`: Megatron's TE spec (H100, FP8 via `TransformerConfig.fp8`). Transformer
  Engine is imported only when this spec is asked for; it cannot be installed on a CPU machine.

Core attention (`model.attention_backend`) is the spec's `core_attention` submodule: `sdpa`
(rf_megatron/sdpa_attention.py, PyTorch's fused kernels), `unfused` (Megatron's `DotProductAttention`,
the `[b, heads, s, s]` scores materialised) or `te` (Transformer Engine's, the TE spec's own); `auto` is
`te` on the TE spec and `sdpa` otherwise.
"""
from __future__ import annotations

import dataclasses
import functools

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from .attention import SVFormerSelfAttention, ValueResidualSelfAttention
from .config import ConfigError, ModelConfig
from .layer import ValueResidualTransformerLayer
from .layer_compile import RowParallelLinearWithGroup
from .norm import SequenceParallelNorm
from .sdpa_attention import SDPADotProductAttention

ATTENTION_CLASSES = {"resformer": ValueResidualSelfAttention, "svformer": SVFormerSelfAttention}
CORE_ATTENTION = {"sdpa": SDPADotProductAttention, "unfused": DotProductAttention}


def attention_backend(model: ModelConfig, transformer_impl: str) -> str:
    """The core attention a model gets: `auto` is Transformer Engine's with its spec, SDPA otherwise."""
    if model.attention_backend != "auto":
        return model.attention_backend
    return "te" if transformer_impl == "transformer_engine" else "sdpa"


def _with_core_attention(spec: ModuleSpec, backend: str) -> ModuleSpec:
    """`spec` with its self-attention's core attention replaced (`te`: the TE spec's own is kept)."""
    if backend not in CORE_ATTENTION:
        return spec
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules,
                                                                    core_attention=CORE_ATTENTION[backend]))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))


def _base_layer_spec(model: ModelConfig, transformer_impl: str) -> ModuleSpec:
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401  (lazy: GPU clusters only)
        except ImportError as exc:
            raise ConfigError("transformer_impl=transformer_engine needs Transformer Engine "
                              "(pip install 'rf-megatron[gpu]' on a CUDA machine)") from exc
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm,
                                                    normalization=model.normalization)
    sub = spec.submodules
    attn = sub.self_attention
    attn_sub = dataclasses.replace(attn.submodules, linear_proj=RowParallelLinearWithGroup)
    if model.qk_layernorm:
        attn_sub = dataclasses.replace(attn_sub, q_layernorm=SequenceParallelNorm, k_layernorm=SequenceParallelNorm)
    sub = dataclasses.replace(sub, input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=SequenceParallelNorm,
                              self_attention=dataclasses.replace(attn, submodules=attn_sub),
                              mlp=_with_linear_fc2(sub.mlp, RowParallelLinearWithGroup))
    return dataclasses.replace(spec, submodules=sub)


def _with_linear_fc2(mlp, linear):
    """The MLP's spec with its `linear_fc2` replaced: a ModuleSpec (Megatron-Core 0.16) or a `functools.partial`
    builder holding the submodules (0.19)."""
    if isinstance(mlp, functools.partial):
        submodules = dataclasses.replace(mlp.keywords["submodules"], linear_fc2=linear)
        return functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": submodules})
    return dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, linear_fc2=linear))


def layer_spec(model: ModelConfig, transformer_impl: str = "local", v1=None) -> ModuleSpec:
    """The transformer-layer spec of a model: Megatron's, with the chosen core attention and value-residual
    attention swapped in. `v1`: the model chunk's V1Carrier, which its layers and attentions share."""
    spec = _with_core_attention(_base_layer_spec(model, transformer_impl), attention_backend(model, transformer_impl))
    if not model.value_residual:
        return spec
    if v1 is None:
        raise ValueError("a value-residual layer spec needs the model chunk's V1Carrier (rf_megatron.v1_packing)")
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, module=ATTENTION_CLASSES[model.variant],
                               params={**attn.params, "rf_config": model, "v1": v1})
    return dataclasses.replace(spec, module=ValueResidualTransformerLayer, params={**spec.params, "v1": v1},
                               submodules=dataclasses.replace(spec.submodules, self_attention=attn))


def block_spec(model: ModelConfig, config, transformer_impl: str = "local", vp_stage=None, v1=None):
    """A block spec, so the block's final norm is the SP-capable one too (local spec)."""
    spec = layer_spec(model, transformer_impl, v1)
    if transformer_impl == "transformer_engine":
        return spec
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=SequenceParallelNorm)
