"""Value-residual GPT for transformers 5.x: ResFormer and SVFormer (arXiv 2410.17897).

Transformers' Llama (RMSNorm, rotate-half RoPE, SwiGLU, GQA) plus the value residual:

    layer 1          V_1 = W_v^1 x                       (plain attention; V_1 goes to every later layer)
    resformer n >= 2 V'_n = lambda1 * V_1 + lambda2 * V_n
    svformer  n >= 2 V'_n = V_1                          (no value projection at all)

The mix happens on the new tokens' values, after the projections and before the KV-cache update
(RoPE touches only Q and K), so a ResFormer cache holds the mixed values of every layer. An SVFormer
cache (`SharedValueCache`) holds the keys of every layer and the values ONCE (layer 1's): L layers of
K plus one of V, (L+1)/(2L) of a Llama cache of the same shape.

The lambda modes (their parameters, init and rule) come from value_residual_spec.py, the method's one
description, shared with the Megatron model. This file is copied next to exported weights (with its sibling
configuration and spec files) and loaded with `trust_remote_code=True`; it imports only torch and transformers.
It is longer than our other modules for that reason: remote code is one self-contained file per model class
(cache, attention, layer, model, causal-LM head), as transformers' own modeling files are.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_rfgpt import RFGPTConfig
from .value_residual_spec import (MODES, has_value_projection, layer_param_names, mix_values, model_param_names,
                                  new_parameters)

# transformers 5.24 renamed the cache argument `past_key_values` -> `cache` (forward arguments, model outputs,
# generate()'s model_kwargs, create_causal_mask); 5.10-5.23 know only the old name. We accept both from
# callers and speak the installed version's name to transformers.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def take_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache a caller passed under either name."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# --------------------------------------------------------------------------------------------------
# SVFormer's KV cache: keys for every layer, values once
# --------------------------------------------------------------------------------------------------
class SharedValueLayer(DynamicLayer):
    """The cache of an SVFormer layer n >= 2: its own keys; its values are layer 1's (`source`).

    Layer 1 runs (and updates its cache) before layer n in every forward, so `source.values`
    already holds the new tokens when `update` returns it.
    """

    def __init__(self, source: DynamicLayer):
        super().__init__()
        self.source = source

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.tensor([], dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        return self.keys, self.source.values

    def offload(self):
        if self.is_initialized:
            self.keys = self.keys.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self.keys = self.keys.to(self.device, non_blocking=True)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.keys = self.keys[..., :tokens_to_remove, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.keys = self.keys[indices, ...]


class SharedValueCache(DynamicCache):
    """A dynamic cache for SVFormer: layer 1 stores K and V, layers >= 2 store K only."""

    def __init__(self, config: RFGPTConfig | None = None, num_layers: int | None = None, **kwargs):
        num_layers = num_layers if num_layers is not None else config.num_hidden_layers
        first = DynamicLayer()
        Cache.__init__(self, layers=[first] + [SharedValueLayer(first) for _ in range(num_layers - 1)])


def cache_nbytes(cache: Cache) -> int:
    """Bytes of tensor storage a cache holds (each storage counted once)."""
    storages = {}
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                storage = tensor.untyped_storage()
                storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
class RFGPTAttention(nn.Module):
    """Llama attention whose values are mixed with (ResFormer) or replaced by (SVFormer) V_1."""

    def __init__(self, config: RFGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        mixing = config.value_residual_layers()
        self.shares_v1 = not has_value_projection(config.variant, layer_idx + 1)
        self.mixes_v1 = config.variant == "resformer" and (layer_idx + 1) in mixing
        self.mixing_index = mixing.index(layer_idx + 1) if self.mixes_v1 else None
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = (None if self.shares_v1 else
                       nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias))
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_layernorm else None
        self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_layernorm else None
        # the lambda mode's per-layer parameters (learnable: value_residual_lambdas = [lambda1, lambda2];
        # learnable_plus: value_residual_lambda2), None where this layer or mode has none
        self.mode = MODES[config.lambda_mode]
        for name in layer_param_names():
            setattr(self, name, None)
        if self.mixes_v1:
            for name, param in new_parameters(self.mode.layer_params, len(mixing)).items():
                setattr(self, name, param)

    def lambdas(self, shared_lambda: torch.Tensor | None):
        """(lambda1, lambda2) of this layer; `shared_lambda` is its share of the model-wide parameters."""
        own = {p.name: getattr(self, p.name) for p in self.mode.layer_params}
        return self.mode.pair(own, shared_lambda, self.config.lambda_constant)

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: torch.Tensor | None = None,
        shared_lambda: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns (output, attention weights, V_1 of the new tokens if this is layer 1 else None)."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.q_norm is not None:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)

        v1 = None
        if self.shares_v1:
            value_states = v_first  # SVFormer: attend over V_1
        else:
            value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            if self.layer_idx == 0:
                v1 = value_states
            elif self.mixes_v1:  # ResFormer: mix the new tokens' values before they enter the cache
                value_states = mix_values(v_first, value_states, *self.lambdas(shared_lambda))

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            # A SharedValueLayer stores only the keys and returns layer 1's cached values; any other
            # cache layer stores what it is given (for SVFormer: a copy of V_1, correct but no saving).
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights, v1


class RFGPTDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: RFGPTConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = RFGPTAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: torch.Tensor | None = None,
        shared_lambda: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`v_first` and `shared_lambda` are positional so that gradient checkpointing sees them as inputs.
        Returns (hidden states, V_1 if this is layer 1 else None)."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _, v1 = self.self_attn(
            hidden_states,
            v_first,
            shared_lambda,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states, v1


class RFGPTPreTrainedModel(PreTrainedModel):
    config_class = RFGPTConfig
    config: RFGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RFGPTDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the SVFormer cache is dynamic
    _can_record_outputs = {
        "hidden_states": RFGPTDecoderLayer,
        "attentions": RFGPTAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        count = len(self.config.value_residual_layers())
        mode = MODES[self.config.lambda_mode]
        params = (mode.layer_params if isinstance(module, RFGPTAttention) else
                  mode.model_params if isinstance(module, RFGPTModel) else ())
        for p in params:
            if getattr(module, p.name, None) is not None:
                init.constant_(getattr(module, p.name), float(p.init(count)))


class RFGPTModel(RFGPTPreTrainedModel):
    def __init__(self, config: RFGPTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [RFGPTDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        # the lambda mode's model-wide parameters (learnable_plus: value_residual_logits z and _scale s,
        # lambda1_n = s * softmax(z)_n over the mixing layers), None where the mode has none
        self.lambda_mode = MODES[config.lambda_mode]
        for name in model_param_names():
            setattr(self, name, None)
        if config.variant == "resformer":
            count = len(config.value_residual_layers())
            for name, param in new_parameters(self.lambda_mode.model_params, count).items():
                setattr(self, name, param)
        self.post_init()

    def new_cache(self) -> Cache:
        """The cache this model fills by default: SVFormer's shared-value cache, else a DynamicCache."""
        if self.config.variant == "svformer":
            return SharedValueCache(self.config)
        return DynamicCache(config=self.config)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = take_cache(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = self.new_cache()
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_ARG: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        shared = None  # the mode's model-wide lambda values, one entry per mixing layer
        if self.config.variant == "resformer" and self.lambda_mode.shared_values is not None:
            shared = self.lambda_mode.shared_values({p.name: getattr(self, p.name) for p in self.lambda_mode.model_params})
        v_first = None
        for layer_idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            index = decoder_layer.self_attn.mixing_index
            hidden_states, v1 = decoder_layer(
                hidden_states,
                v_first,
                shared[index] if shared is not None and index is not None else None,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            if v1 is not None:
                v_first = v1

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_ARG: cache})


class RFGPTForCausalLM(RFGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RFGPTConfig):
        super().__init__(config)
        self.model = RFGPTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() builds a plain DynamicCache; SVFormer swaps in its shared-value cache."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_ARG)
        if (self.config.variant == "svformer" and type(cache) is DynamicCache and not cache.offloading
                and not getattr(cache, "_is_user_defined", False) and cache.get_seq_length() == 0):
            model_kwargs[CACHE_ARG] = SharedValueCache(self.config)
        return result

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """`cache` (transformers >= 5.24) and `past_key_values` (older) are the same argument."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=take_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
        )


__all__ = ["RFGPTForCausalLM", "RFGPTModel", "RFGPTPreTrainedModel", "SharedValueCache", "cache_nbytes"]
