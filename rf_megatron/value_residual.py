"""Value residual inside Megatron-Core: the lambda modules of ResFormer's attention layers.

The method itself (the variants, the lambda modes with their parameters and rules, which layers mix, and
`V'_n = lambda1 * V_1 + lambda2 * V_n`) is described once in `rf_megatron/value_residual_spec.py`, which
the HF model, the weight maps and the FLOP counts read too. This module only holds a mode's parameters the way
Megatron needs them: replicated on every TP rank (gradients summed over TP), one checkpoint key per layer, and
the model-wide parameters (learnable_plus's softmax logits and scale) copied into every pipeline stage.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .value_residual_spec import MODES, LambdaMode, lambdas_of, mix_values, mixing_layers, new_parameters

__all__ = ["mix_values", "LayerLambdas", "SharedLambdas", "build_lambdas", "build_shared_lambdas", "mixing_layers_of"]


def _mark_replicated(param: nn.Parameter) -> nn.Parameter:
    """Lambdas are replicated on every TP rank, but each rank only sees its own heads' share of
    the gradient: rf_megatron.grads sums these over the TP group (like Megatron's q/k norms)."""
    param.value_residual_tp_sum = True
    return param


class _PerLayerCheckpoint:
    """One checkpoint key per global layer (`...value_residual_lambdas.layer{n}`): Megatron would
    otherwise stack them along a layer axis in which layer 1 (no lambdas) leaves a hole."""

    layer_number: int

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        return {f"{prefix}{name}": make_sharded_tensor_for_checkpoint(
                    param, f"{prefix}{name}.layer{self.layer_number}")
                for name, param in self.state_dict(keep_vars=True).items()}


class LayerLambdas(_PerLayerCheckpoint, nn.Module):
    """(lambda1, lambda2) of one mixing layer: the mode's per-layer parameters (none for identity, constant,
    sparse) plus, for modes with model-wide parameters, this layer's share of them (`shared_of`)."""

    def __init__(self, mode: LambdaMode, layer_number: int, index: int, mixing_count: int, constant: float):
        super().__init__()
        self.mode, self.layer_number, self.constant = mode, layer_number, constant
        # this layer's place among the mixing layers (its share of the model-wide parameters) as a tensor, kept out
        # of checkpoints: an int would make torch.compile trace one graph per layer (rf_megatron/layer_compile.py)
        self.register_buffer("index", torch.tensor([index]), persistent=False)
        for name, param in new_parameters(mode.layer_params, mixing_count).items():
            self.register_parameter(name, _mark_replicated(param))
        # the model-wide parameters of this model chunk ({name: tensor}), attached by the model: a bound method,
        # so the shared module is not registered again under every layer
        self.shared_of: Optional[Callable[[], Dict[str, torch.Tensor]]] = None

    @property
    def learnable(self) -> bool:
        return self.mode.learnable

    def forward(self) -> Tuple:
        own = dict(self.named_parameters(recurse=False))
        return lambdas_of(self.mode, own, self.shared_of() if self.shared_of else {}, self.index, self.constant)


class SharedLambdas(nn.Module):
    """The model-wide parameters of a mode (learnable_plus: logits z over the mixing layers and the scale s).

    Every pipeline stage (and virtual chunk) holds a copy; rf_megatron.grads sums their gradients so the copies
    stay identical.
    """

    def __init__(self, mode: LambdaMode, mixing_count: int):
        super().__init__()
        for name, param in new_parameters(mode.model_params, mixing_count).items():
            param.value_residual_pp_shared = name
            self.register_parameter(name, _mark_replicated(param))

    def values(self) -> Dict[str, torch.Tensor]:
        return dict(self.named_parameters(recurse=False))


def mixing_layers_of(model_cfg) -> Tuple[int, ...]:
    """The 1-based layers that mix in V_1."""
    return tuple(mixing_layers(model_cfg.variant, model_cfg.lambda_mode, model_cfg.num_layers,
                               model_cfg.sparse_layers))


def build_lambdas(model_cfg, layer_number: int) -> Optional[LayerLambdas]:
    """The lambda module of one ResFormer layer, or None where the layer does not mix."""
    layers = mixing_layers_of(model_cfg)
    if layer_number not in layers:
        return None
    return LayerLambdas(MODES[model_cfg.lambda_mode], layer_number, layers.index(layer_number), len(layers),
                        model_cfg.lambda_constant)


def build_shared_lambdas(model_cfg) -> Optional[SharedLambdas]:
    """The model-wide lambda parameters, or None where the mode has none."""
    mode = MODES[model_cfg.lambda_mode]
    if model_cfg.variant != "resformer" or not mode.model_params:
        return None
    return SharedLambdas(mode, len(mixing_layers_of(model_cfg)))
