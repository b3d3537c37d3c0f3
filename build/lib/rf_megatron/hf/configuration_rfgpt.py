"""Configuration of value-residual GPT models (ResFormer / SVFormer, arXiv 2410.17897).

A Llama configuration plus the value-residual choice. This file is copied next to exported weights
and loaded with `trust_remote_code=True`, with value_residual_spec.py (the method's one description:
variants, lambda modes, which layers mix); it imports nothing else but transformers.
"""
from __future__ import annotations

from transformers.models.llama.configuration_llama import LlamaConfig

from .value_residual_spec import config_problem, mixing_layers


class RFGPTConfig(LlamaConfig):
    r"""
    Args (beyond [`LlamaConfig`]'s):
        variant (`str`): `vanilla`, `resformer` or `svformer`.
        lambda_mode (`str`): ResFormer's lambdas, one of value_residual_spec.MODES: `identity` (0.5, 0.5),
            `constant` (lambda_constant, 1), `learnable` (per-layer parameters), `learnable_plus`
            (lambda1 = s * softmax(z) over the mixing layers, lambda2 per layer) or `sparse` (identity on
            `sparse_layers` only).
        lambda_constant (`float`): lambda1 of the `constant` mode.
        sparse_layers (`list[int]`, *optional*): the 1-based layers that mix in V_1 in `sparse` mode
            (default: the last half). Older exports call it `residual_layers`; that key still loads.
        qk_layernorm (`bool`): RMSNorm over the head dimension of queries and keys, before RoPE.
    """

    model_type = "rfgpt"

    variant: str = "resformer"
    lambda_mode: str = "identity"
    lambda_constant: float = 2.0
    sparse_layers: list[int] | None = None
    qk_layernorm: bool = False

    def __post_init__(self, **kwargs):
        if kwargs.get("residual_layers") is not None and self.sparse_layers is None:  # the pre-rename key
            self.sparse_layers = kwargs["residual_layers"]
        kwargs.pop("residual_layers", None)
        super().__post_init__(**kwargs)
        problem = config_problem(self.variant, self.lambda_mode, self.num_hidden_layers, self.sparse_layers)
        if problem:
            raise ValueError(problem)

    def value_residual_layers(self) -> list[int]:
        """The 1-based layers whose values are mixed with (resformer) or replaced by (svformer) V_1."""
        return mixing_layers(self.variant, self.lambda_mode, self.num_hidden_layers, self.sparse_layers)


__all__ = ["RFGPTConfig"]
