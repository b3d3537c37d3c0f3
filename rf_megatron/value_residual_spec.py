"""Value residual (ResFormer / SVFormer, arXiv 2410.17897), described once for every consumer.

For every attention layer n >= 2 (1-based) the values entering attention are

    vanilla    V'_n = V_n
    resformer  V'_n = lambda1 * V_1 + lambda2 * V_n      (the lambda mode below picks lambda1, lambda2)
    svformer   V'_n = V_1                                (layers >= 2 have no value projection at all)

V_1 is not detached. A lambda mode is its parameters (names, sizes, init) and the rule that turns them into
(lambda1, lambda2) for one layer; that is all a new mode needs, in MODES below. Megatron's attention
(rf_megatron/value_residual.py), the HF configuration and modeling code, the weight maps, the parameter and
FLOP counts and the config checks all read this file. It is copied next to every exported RFGPT model
(trust_remote_code loads it with the config; rf_megatron/hf/value_residual_spec.py re-exports it inside the
package), so it imports nothing but torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

VARIANTS = ("vanilla", "resformer", "svformer")


def mix_values(v1, vn, lambda1, lambda2):
    """V'_n = lambda1 * V_1 + lambda2 * V_n."""
    return lambda1 * v1 + lambda2 * vn


@dataclass(frozen=True)
class Param:
    """A learnable lambda tensor: the same name in Megatron and HF state dicts (`...self_attn.NAME` per layer,
    `model.NAME` per model). `size` and `init` are functions of the number of mixing layers."""

    name: str
    size: Callable[[int], int]
    init: Callable[[int], float]


@dataclass(frozen=True)
class LambdaMode:
    """How a mixing layer gets (lambda1, lambda2).

    `pair(own, shared, constant)`: `own` maps this layer's parameter names to tensors, `shared` is this layer's
    entry of `shared_values(model params)` (None where the mode has no model-wide parameters), `constant` is
    the config's lambda_constant. `chosen_layers_only`: only the configured sparse layers mix.
    """

    name: str
    doc: str
    pair: Callable[[Dict[str, torch.Tensor], Optional[torch.Tensor], float], Tuple]
    layer_params: Tuple[Param, ...] = ()
    model_params: Tuple[Param, ...] = ()
    shared_values: Optional[Callable[[Dict[str, torch.Tensor]], torch.Tensor]] = None
    chosen_layers_only: bool = False

    @property
    def learnable(self) -> bool:
        return bool(self.layer_params or self.model_params)


def _half(own, shared, constant):
    return 0.5, 0.5


MODES: Dict[str, LambdaMode] = {mode.name: mode for mode in (
    LambdaMode("identity", "lambda1 = lambda2 = 0.5 (the paper's released code)", _half),
    LambdaMode("constant", "lambda1 = lambda_constant, lambda2 = 1: A(V_n + c V_1)",
               lambda own, shared, constant: (constant, 1.0)),
    LambdaMode("learnable", "per-layer scalars lambda1, lambda2, both initialised to 0.5",
               lambda own, shared, constant: (own["value_residual_lambdas"][0], own["value_residual_lambdas"][1]),
               layer_params=(Param("value_residual_lambdas", lambda n: 2, lambda n: 0.5),)),
    LambdaMode("learnable_plus", "lambda1_n = s * softmax(z)_n over the mixing layers (s initialised to their "
               "count, so every lambda1 starts at 1), lambda2_n per layer initialised to 0.5",
               lambda own, shared, constant: (shared, own["value_residual_lambda2"][0]),
               layer_params=(Param("value_residual_lambda2", lambda n: 1, lambda n: 0.5),),
               model_params=(Param("value_residual_logits", lambda n: n, lambda n: 0.0),
                             Param("value_residual_scale", lambda n: 1, float)),
               shared_values=lambda p: p["value_residual_scale"][0] * torch.softmax(p["value_residual_logits"], 0)),
    LambdaMode("sparse", "identity, on the chosen layers only (sparse_layers; the others are plain attention)",
               _half, chosen_layers_only=True),
)}


def layer_param_names() -> Tuple[str, ...]:
    """Every per-layer parameter name any mode uses (the weight maps and the HF modules read these)."""
    return tuple(dict.fromkeys(p.name for m in MODES.values() for p in m.layer_params))


def model_param_names() -> Tuple[str, ...]:
    """Every model-wide parameter name any mode uses."""
    return tuple(dict.fromkeys(p.name for m in MODES.values() for p in m.model_params))


def default_sparse_layers(num_layers: int) -> List[int]:
    """`sparse` without a choice: the last half of the layers."""
    return list(range(num_layers // 2 + 1, num_layers + 1))


def mixing_layers(variant: str, lambda_mode: str, num_layers: int,
                  sparse_layers: Optional[Sequence[int]] = None) -> List[int]:
    """The 1-based layers whose values are mixed with (resformer) or replaced by (svformer) V_1."""
    if variant == "vanilla":
        return []
    if variant == "resformer" and MODES[lambda_mode].chosen_layers_only:
        return sorted(sparse_layers) if sparse_layers is not None else default_sparse_layers(num_layers)
    return list(range(2, num_layers + 1))


def has_value_projection(variant: str, layer: int) -> bool:
    """SVFormer's layers >= 2 (1-based) have no V projection: they attend over V_1."""
    return variant != "svformer" or layer == 1


def config_problem(variant: str, lambda_mode: str, num_layers: int,
                   sparse_layers: Optional[Sequence[int]] = None) -> Optional[str]:
    """One line saying what is wrong with a value-residual choice, or None."""
    if variant not in VARIANTS:
        return f"variant={variant!r}: choose one of {', '.join(VARIANTS)}"
    if lambda_mode not in MODES:
        return f"lambda_mode={lambda_mode!r}: choose one of {', '.join(MODES)}"
    if variant != "vanilla" and num_layers < 2:
        return f"variant={variant} needs num_layers >= 2 (layer 1 provides V_1)"
    if variant == "svformer" and lambda_mode != "identity":
        return f"lambda_mode={lambda_mode!r} applies to resformer; svformer uses V_1 as is"
    if variant == "resformer" and MODES[lambda_mode].chosen_layers_only and sparse_layers is not None:
        if not sparse_layers:
            return f"sparse_layers={list(sparse_layers)}: choose at least one layer"
        if any(not 2 <= n <= num_layers for n in sparse_layers):
            return f"sparse_layers={list(sparse_layers)}: layers must lie in 2..{num_layers}"
    return None


def lambda_parameter_count(variant: str, lambda_mode: str, num_layers: int,
                           sparse_layers: Optional[Sequence[int]] = None) -> int:
    """Learnable lambda scalars in the whole model."""
    if variant != "resformer":
        return 0
    mode, n = MODES[lambda_mode], len(mixing_layers(variant, lambda_mode, num_layers, sparse_layers))
    return sum(p.size(n) for p in mode.model_params) + n * sum(p.size(n) for p in mode.layer_params)


def new_parameters(params: Sequence[Param], mixing_count: int) -> Dict[str, torch.nn.Parameter]:
    """Freshly initialised parameters, for Megatron's and HF's modules alike."""
    return {p.name: torch.nn.Parameter(torch.full((p.size(mixing_count),), float(p.init(mixing_count))))
            for p in params}


def lambdas_of(mode: LambdaMode, own: Dict[str, torch.Tensor], model: Dict[str, torch.Tensor],
               index: Union[int, torch.Tensor], constant: float) -> Tuple:
    """(lambda1, lambda2) of the `index`-th mixing layer from its own and the model-wide parameters. `index`: an
    int, or a one-element long tensor (the same graph for every layer under torch.compile)."""
    shared = None
    if mode.shared_values:
        values = mode.shared_values(model)
        shared = values[index] if isinstance(index, int) else values.index_select(0, index)[0]
    return mode.pair(own, shared, constant)
