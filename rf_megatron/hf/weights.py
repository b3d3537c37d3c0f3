"""Megatron (global parameter names: those of the TP1 x PP1 model) <-> Hugging Face names and configs.

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
...self_attention.value_lambdas.{P}                      model.layers.{i}.self_attn.{P}   (P: a mode's per-layer lambda
value_residual_plus.{P}                                  model.{P}                        or model-wide parameter,
                                                                        named in value_residual_spec.MODES)

`layer_rules` and `global_rules` hold this map once: export applies each rule's split, import its fuse.

Transformer Engine specs fuse the norms into the linears (`linear_qkv.layer_norm_weight`,
`mlp.linear_fc1.layer_norm_weight`); Megatron's local spec already saves its norms under those
sharded keys (`sharded_state_dict_keys_map`), so checkpoints of either spec load into the local
TP1 model, and both spellings of a state dict are accepted here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..config import ModelConfig
from ..value_residual_spec import MODES, has_value_projection, lambdas_of, mixing_layers


class ConversionError(ValueError):
    """A model or checkpoint the converter cannot represent. One line, naming the problem."""


RFGPT_FILES = ("configuration_rfgpt.py", "modeling_rfgpt.py", "value_residual_spec.py")
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
        intermediate_size=model.ffn_size,
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
                      sparse_layers=list(model.sparse_layers) if model.sparse_layers is not None else None,
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
        lambda_constant=float(config.get("lambda_constant", 2.0)),
        sparse_layers=config.get("sparse_layers", config.get("residual_layers")),  # the pre-rename key too
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
    return (q, k, w[:, hpg + 1].reshape(groups * d, -1)) if has_v else (q, k)


def _fuse_qkv(model: ModelConfig, q, k, v=None) -> torch.Tensor:
    heads, groups, d = model.num_attention_heads, model.kv_heads, model.head_dim
    parts = [q.reshape(groups, heads // groups, d, -1), k.reshape(groups, 1, d, -1)]
    if v is not None:
        parts.append(v.reshape(groups, 1, d, -1))
    return torch.cat(parts, dim=1).reshape(-1, q.shape[-1])


def _has_v(model: ModelConfig, layer: int) -> bool:
    return has_value_projection(model.variant, layer + 1)


GLOBALS_TO_HF = {  # model-level tensors: Megatron name -> HF name (output_layer only when untied; the lambda
    # modes' model-wide parameters join in global_rules)
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor <-> its HF tensor(s). Export applies `split`, import `fuse` (its inverse);
    without them the tensor is copied as is."""

    megatron: str
    hf: Tuple[str, ...]
    split: Optional[Callable] = None
    fuse: Optional[Callable] = None


def layer_rules(model: ModelConfig, i: int) -> List[Rule]:
    """The weight map of layer i (0-based): Megatron names inside `decoder.layers.{i}.`, HF names inside
    `model.layers.{i}.`. Export and import both read this one list, in opposite directions."""
    has_v = _has_v(model, i)
    qkv = ("self_attn.q_proj.weight", "self_attn.k_proj.weight") + (("self_attn.v_proj.weight",) if has_v else ())
    rules = [
        Rule("input_layernorm.weight", ("input_layernorm.weight",)),
        # rows grouped per KV group: [q (heads/groups), k, v] for each group; SVFormer layers >= 2: [q..., k]
        Rule("self_attention.linear_qkv.weight", qkv, lambda w: _split_qkv(w, model, has_v),
             lambda *t: _fuse_qkv(model, *t)),
        Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
        Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),  # [gate; up]
             lambda w: tuple(w.chunk(2, dim=0)), lambda gate, up: torch.cat([gate, up], dim=0)),
        Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    ]
    if model.qk_layernorm:
        rules += [Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)),
                  Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",))]
    if model.variant == "resformer" and i + 1 in mixing_layers(model.variant, model.lambda_mode, model.num_layers,
                                                                 model.sparse_layers):
        rules += [Rule(f"self_attention.value_lambdas.{p.name}", (f"self_attn.{p.name}",))
                  for p in MODES[model.lambda_mode].layer_params]
    return rules


def global_rules(model: ModelConfig) -> Dict[str, str]:
    """Megatron name -> HF name of the model-level tensors this model has."""
    rules = dict(GLOBALS_TO_HF)
    if not model.untie_embeddings_and_output_weights:
        del rules["output_layer.weight"]
    if model.variant == "resformer":
        rules.update({f"value_residual_plus.{p.name}": f"model.{p.name}" for p in MODES[model.lambda_mode].model_params})
    return rules


def _refuse_leftovers(what: str, names) -> None:
    """`what`: "checkpoint tensors with no HF counterpart" or the reverse."""
    names = sorted(names)
    if names:
        raise ConversionError(f"{what}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))


def global_names_to_hf(names, model: ModelConfig) -> Dict[str, str]:
    """{Megatron name: HF name} of the model-level tensors; refuses missing and unknown ones."""
    names = set(names)
    if not model.untie_embeddings_and_output_weights:
        names.discard("output_layer.weight")  # a tied model's copy of the embedding
    wanted = global_rules(model)
    for name in sorted(set(wanted) - names):
        raise ConversionError(f"checkpoint has no {name}")
    _refuse_leftovers("checkpoint tensors with no HF counterpart", names - set(wanted))
    return wanted


def layer_to_hf(i: int, layer: Dict[str, torch.Tensor], model: ModelConfig) -> Dict[str, torch.Tensor]:
    """Layer i's Megatron tensors (names inside `decoder.layers.{i}.`) -> its HF tensors; each used exactly once.
    Works on meta tensors too (a converter plans its output shapes from the checkpoint metadata)."""
    layer = dict(layer)
    for local, te in _NORM_ALIASES.items():  # TE spelling of the fused norms -> local spelling
        if te in layer:
            layer[local] = layer.pop(te)
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    hf = {}
    for rule in layer_rules(model, i):
        if rule.megatron not in layer:
            raise ConversionError(f"checkpoint has no {m}{rule.megatron}")
        tensor = layer.pop(rule.megatron)
        parts = rule.split(tensor) if rule.split else (tensor,)
        hf.update({h + name: part for name, part in zip(rule.hf, parts)})
    _refuse_leftovers("checkpoint tensors with no HF counterpart", (m + name for name in layer))
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


def layer_from_hf(i: int, take: Callable[[str], torch.Tensor], model: ModelConfig) -> Dict[str, torch.Tensor]:
    """Layer i's Megatron tensors (names inside `decoder.layers.{i}.`) from its HF tensors, `take(HF name)`:
    layer_to_hf inverted. Works on meta tensors too."""
    h = f"model.layers.{i}."
    out = {}
    for rule in layer_rules(model, i):
        parts = [take(h + name) for name in rule.hf]
        out[rule.megatron] = (rule.fuse(*parts) if rule.fuse else parts[0]).detach().contiguous()
    return out


def hf_to_megatron(hf: Dict[str, torch.Tensor], model: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF state dict -> global Megatron state dict (TP1 x PP1 names): the same rules, inverted. Every HF
    tensor must be used exactly once (on meta tensors: the importer's check of names and shapes)."""
    left = dict(hf)
    if not model.untie_embeddings_and_output_weights:
        left.pop("lm_head.weight", None)  # tied: the embedding's copy

    def take(name):
        if name not in left:
            raise ConversionError(f"HF weights have no {name}")
        return left.pop(name)

    m_state = {name: take(hf_name).detach().contiguous() for name, hf_name in global_rules(model).items()}
    for i in range(model.num_layers):
        m_state.update({f"decoder.layers.{i}.{name}": t for name, t in layer_from_hf(i, take, model).items()})
    _refuse_leftovers("HF tensors with no Megatron counterpart", left)
    return m_state


def lambda_table(hf: Dict[str, torch.Tensor], model: ModelConfig) -> Dict[int, Tuple[float, float]]:
    """(lambda1, lambda2) per 1-based layer that mixes in V_1, read from the weights where learnable."""
    if model.variant != "resformer":
        return {}
    mode = MODES[model.lambda_mode]
    shared = {p.name: hf[f"model.{p.name}"].float() for p in mode.model_params}
    out = {}
    for index, n in enumerate(mixing_layers(model.variant, model.lambda_mode, model.num_layers, model.sparse_layers)):
        own = {p.name: hf[f"model.layers.{n - 1}.self_attn.{p.name}"].float() for p in mode.layer_params}
        out[n] = tuple(float(x) for x in lambdas_of(mode, own, shared, index, model.lambda_constant))
    return out
