"""Megatron (TP1 x PP1 global names, rf_megatron/state.py) <-> Hugging Face names and configs.

Megatron                                                 HF (Llama / RFGPT)
embedding.word_embeddings.weight                         model.embed_tokens.weight
decoder.layers.{i}.input_layernorm.weight                model.layers.{i}.input_layernorm.weight
decoder.layers.{i}.self_attention.linear_qkv.weight      model.layers.{i}.self_attn.{q,k,v}_proj.weight
   rows grouped per KV group: [q (heads/groups), k, v] for each group; SVFormer layers >= 2: [q..., k]
decoder.layers.{i}.self_attention.{q,k}_layernorm.weight model.layers.{i}.self_attn.{q,k}_norm.weight
decoder.layers.{i}.self_attention.linear_proj.weight     model.layers.{i}.self_attn.o_proj.weight
decoder.layers.{i}.pre_mlp_layernorm.weight              model.layers.{i}.post_attention_layernorm.weight
decoder.layers.{i}.mlp.linear_fc1.weight  ([gate; up])   model.layers.{i}.mlp.{gate,up}_proj.weight
decoder.layers.{i}.mlp.linear_fc2.weight                 model.layers.{i}.mlp.down_proj.weight
decoder.final_layernorm.weight                           model.norm.weight
output_layer.weight (absent when tied)                   lm_head.weight
...self_attention.value_lambdas.value_residual_lambdas   model.layers.{i}.self_attn.value_residual_lambdas
...self_attention.value_lambdas.value_residual_lambda2   model.layers.{i}.self_attn.value_residual_lambda2
value_residual_plus.value_residual_logits / _scale       model.value_residual_logits / _scale

Transformer Engine specs fuse the norms into the linears (`linear_qkv.layer_norm_weight`,
`mlp.linear_fc1.layer_norm_weight`); Megatron's local spec already saves its norms under those
sharded keys (`sharded_state_dict_keys_map`), so checkpoints of either spec load into the local
TP1 model, and both spellings of a state dict are accepted here.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch

from ..config import ModelConfig


class ConversionError(ValueError):
    """A model or checkpoint the converter cannot represent. One line, naming the problem."""


RFGPT_FILES = ("configuration_rfgpt.py", "modeling_rfgpt.py")
AUTO_MAP = {
    "AutoConfig": "configuration_rfgpt.RFGPTConfig",
    "AutoModel": "modeling_rfgpt.RFGPTModel",
    "AutoModelForCausalLM": "modeling_rfgpt.RFGPTForCausalLM",
}

_NORM_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def check_exportable(model: ModelConfig) -> None:
    """Refuse what a Llama-style HF model cannot express."""
    if model.normalization != "RMSNorm":
        raise ConversionError(f"model.normalization={model.normalization}: only RMSNorm models convert to Llama/RFGPT")
    if not model.swiglu:
        raise ConversionError("model.swiglu=false: only SwiGLU models convert to Llama/RFGPT")


def uses_remote_code(model: ModelConfig) -> bool:
    """Vanilla models without q/k norms are plain Llama; everything else needs modeling_rfgpt.py."""
    return model.variant != "vanilla" or model.qk_layernorm


def hf_config_kwargs(model: ModelConfig, special: Dict[str, Optional[int]]) -> dict:
    """Keyword arguments of LlamaConfig / RFGPTConfig for a model config."""
    kwargs = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size or 4 * model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.kv_heads,
        head_dim=model.head_dim,
        hidden_act="silu",
        max_position_embeddings=model.seq_length,
        initializer_range=model.init_method_std,
        rms_norm_eps=model.layernorm_epsilon,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"),
    )
    if uses_remote_code(model):
        kwargs.update(variant=model.variant, lambda_mode=model.lambda_mode, lambda_constant=model.lambda_constant,
                      residual_layers=list(model.residual_layers) if model.residual_layers is not None else None,
                      qk_layernorm=model.qk_layernorm)
    return kwargs


def model_config_from_hf(config: dict) -> ModelConfig:
    """ModelConfig fields from an HF config.json (model_type llama or rfgpt)."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "rfgpt"):
        raise ConversionError(f"config.json: model_type={model_type!r}; only llama and rfgpt convert to Megatron")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if config.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"config.json: head_dim={config['head_dim']} != hidden_size/num_attention_heads")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, ok) != ok:
            raise ConversionError(f"config.json: {key}={config[key]!r} is not supported (need {ok!r})")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"config.json: rope_type={rope.get('rope_type')!r}: only default RoPE converts")
    if float(theta) != int(theta):
        raise ConversionError(f"config.json: rope_theta={theta} is not an integer (model.rotary_base is)")
    kv = config.get("num_key_value_heads") or heads
    fields = dict(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=None if kv == heads else kv, ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], seq_length=config.get("max_position_embeddings", 2048),
        normalization="RMSNorm", swiglu=True, qk_layernorm=bool(config.get("qk_layernorm", False)),
        init_method_std=config.get("initializer_range", 0.02),
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        rotary_base=int(theta), layernorm_epsilon=config.get("rms_norm_eps", 1e-5),
        variant=config.get("variant", "vanilla"), lambda_mode=config.get("lambda_mode", "identity"),
        lambda_constant=float(config.get("lambda_constant", 2.0)), residual_layers=config.get("residual_layers"),
    )
    return ModelConfig(**fields)


def _split_qkv(w: torch.Tensor, model: ModelConfig, has_v: bool):
    heads, groups, d = model.num_attention_heads, model.kv_heads, model.head_dim
    hpg = heads // groups
    per_group = hpg + (2 if has_v else 1)
    if w.shape[0] != groups * per_group * d:
        raise ConversionError(f"linear_qkv has {w.shape[0]} rows, expected {groups * per_group * d}")
    w = w.reshape(groups, per_group, d, -1)
    q = w[:, :hpg].reshape(heads * d, -1)
    k = w[:, hpg].reshape(groups * d, -1)
    v = w[:, hpg + 1].reshape(groups * d, -1) if has_v else None
    return q, k, v


def _fuse_qkv(q, k, v, model: ModelConfig) -> torch.Tensor:
    heads, groups, d = model.num_attention_heads, model.kv_heads, model.head_dim
    parts = [q.reshape(groups, heads // groups, d, -1), k.reshape(groups, 1, d, -1)]
    if v is not None:
        parts.append(v.reshape(groups, 1, d, -1))
    return torch.cat(parts, dim=1).reshape(-1, q.shape[-1])


def _has_v(model: ModelConfig, layer: int) -> bool:
    return model.variant != "svformer" or layer == 0


# Model-level tensors: Megatron name -> HF name (output_layer only when untied; the value_residual_plus pair
# only in learnable_plus models).
GLOBALS_TO_HF = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
    "value_residual_plus.value_residual_logits": "model.value_residual_logits",
    "value_residual_plus.value_residual_scale": "model.value_residual_scale",
}


def global_names_to_hf(names, model: ModelConfig) -> Dict[str, str]:
    """{Megatron name: HF name} of the model-level tensors present; refuses missing required and unknown ones."""
    names = set(names)
    required = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
    if model.untie_embeddings_and_output_weights:
        required.add("output_layer.weight")
    else:
        names.discard("output_layer.weight")  # a tied model's copy of the embedding
    for name in sorted(required - names):
        raise ConversionError(f"checkpoint has no {name}")
    unknown = sorted(names - set(GLOBALS_TO_HF))
    if unknown:
        raise ConversionError(f"checkpoint tensors with no HF counterpart: {', '.join(unknown[:5])}"
                              + (" ..." if len(unknown) > 5 else ""))
    return {name: GLOBALS_TO_HF[name] for name in sorted(names)}


def layer_to_hf(i: int, layer: Dict[str, torch.Tensor], model: ModelConfig) -> Dict[str, torch.Tensor]:
    """Layer i's Megatron tensors (names inside `decoder.layers.{i}.`) -> its HF tensors; each used exactly once.
    Works on meta tensors too (a converter plans its output shapes from the checkpoint metadata)."""
    layer = dict(layer)
    for local, te in _NORM_ALIASES.items():  # TE spelling of the fused norms -> local spelling
        if te in layer:
            layer[local] = layer.pop(te)
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    used = set()

    def take(name):
        if name not in layer:
            raise ConversionError(f"checkpoint has no {m}{name}")
        used.add(name)
        return layer[name]

    hf = {h + "input_layernorm.weight": take("input_layernorm.weight")}
    q, k, v = _split_qkv(take("self_attention.linear_qkv.weight"), model, _has_v(model, i))
    hf[h + "self_attn.q_proj.weight"], hf[h + "self_attn.k_proj.weight"] = q, k
    if v is not None:
        hf[h + "self_attn.v_proj.weight"] = v
    if model.qk_layernorm:
        hf[h + "self_attn.q_norm.weight"] = take("self_attention.q_layernorm.weight")
        hf[h + "self_attn.k_norm.weight"] = take("self_attention.k_layernorm.weight")
    hf[h + "self_attn.o_proj.weight"] = take("self_attention.linear_proj.weight")
    for name in ("value_residual_lambdas", "value_residual_lambda2"):
        if f"self_attention.value_lambdas.{name}" in layer:
            hf[h + f"self_attn.{name}"] = take(f"self_attention.value_lambdas.{name}")
    hf[h + "post_attention_layernorm.weight"] = take("pre_mlp_layernorm.weight")
    gate, up = take("mlp.linear_fc1.weight").chunk(2, dim=0)
    hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"] = gate, up
    hf[h + "mlp.down_proj.weight"] = take("mlp.linear_fc2.weight")
    left = sorted(set(layer) - used)
    if left:
        raise ConversionError(f"checkpoint tensors with no HF counterpart: {', '.join(m + n for n in left[:5])}"
                              + (" ..." if len(left) > 5 else ""))
    return {k: v.detach().contiguous() for k, v in hf.items()}


def megatron_to_hf(state: Dict[str, torch.Tensor], model: ModelConfig) -> Dict[str, torch.Tensor]:
    """Global Megatron state dict -> HF state dict. Every Megatron tensor must be used exactly once."""
    layers, model_level = [{} for _ in range(model.num_layers)], {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
            continue
        match = _LAYER.match(name)
        if match and int(match.group(1)) < model.num_layers:
            layers[int(match.group(1))][match.group(2)] = tensor
        else:
            model_level[name] = tensor
    hf = {}
    for name, hf_name in global_names_to_hf(model_level, model).items():
        hf[hf_name] = model_level[name].detach().contiguous()
    for i, layer in enumerate(layers):
        hf.update(layer_to_hf(i, layer, model))
    return hf


def hf_to_megatron(hf: Dict[str, torch.Tensor], model: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF state dict -> global Megatron state dict (rf_megatron.state names). Strict both ways."""
    used = set()

    def take(name):
        if name not in hf:
            raise ConversionError(f"HF weights have no {name}")
        used.add(name)
        return hf[name]

    m_state = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight")}
    for i in range(model.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        m_state[m + "input_layernorm.weight"] = take(h + "input_layernorm.weight")
        v = take(h + "self_attn.v_proj.weight") if _has_v(model, i) else None
        m_state[m + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            take(h + "self_attn.q_proj.weight"), take(h + "self_attn.k_proj.weight"), v, model)
        if model.qk_layernorm:
            m_state[m + "self_attention.q_layernorm.weight"] = take(h + "self_attn.q_norm.weight")
            m_state[m + "self_attention.k_layernorm.weight"] = take(h + "self_attn.k_norm.weight")
        m_state[m + "self_attention.linear_proj.weight"] = take(h + "self_attn.o_proj.weight")
        for name in ("value_residual_lambdas", "value_residual_lambda2"):
            if h + f"self_attn.{name}" in hf:
                m_state[f"{m}self_attention.value_lambdas.{name}"] = take(h + f"self_attn.{name}")
        m_state[m + "pre_mlp_layernorm.weight"] = take(h + "post_attention_layernorm.weight")
        m_state[m + "mlp.linear_fc1.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"),
                                                          take(h + "mlp.up_proj.weight")], dim=0)
        m_state[m + "mlp.linear_fc2.weight"] = take(h + "mlp.down_proj.weight")
    m_state["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if model.untie_embeddings_and_output_weights:
        m_state["output_layer.weight"] = take("lm_head.weight")
    for name in ("value_residual_logits", "value_residual_scale"):
        if f"model.{name}" in hf:
            m_state[f"value_residual_plus.{name}"] = take(f"model.{name}")
    left = sorted(set(hf) - used - {"lm_head.weight"})
    if left:
        raise ConversionError(f"HF tensors with no Megatron counterpart: {', '.join(left[:5])}"
                              + (" ..." if len(left) > 5 else ""))
    return {k: v.detach().contiguous() for k, v in m_state.items()}


def lambda_table(hf: Dict[str, torch.Tensor], model: ModelConfig) -> Dict[int, Tuple[float, float]]:
    """(lambda1, lambda2) per 1-based layer that mixes in V_1, read from the weights where learnable."""
    from ..value_residual import residual_layers

    if model.variant != "resformer":
        return {}
    mode, out = model.lambda_mode, {}
    layers = residual_layers(model)
    if mode == "learnable_plus":
        lam1 = (hf["model.value_residual_scale"].float()[0]
                * torch.softmax(hf["model.value_residual_logits"].float(), dim=0))
    for index, n in enumerate(layers):
        if mode in ("identity", "sparse"):
            out[n] = (0.5, 0.5)
        elif mode == "constant":
            out[n] = (float(model.lambda_constant), 1.0)
        elif mode == "learnable":
            lam = hf[f"model.layers.{n - 1}.self_attn.value_residual_lambdas"].float()
            out[n] = (float(lam[0]), float(lam[1]))
        else:
            out[n] = (float(lam1[index]), float(hf[f"model.layers.{n - 1}.self_attn.value_residual_lambda2"].float()[0]))
    return out
