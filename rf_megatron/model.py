"""Value-residual GPT: Megatron-Core's GPTModel plus the V_1 plumbing of one model chunk (and, for every
variant, the loss parallel.cross_entropy chooses: GPTModelWithLossChoice).

What this class adds to `GPTModel` (everything else is Megatron's):
- one `V1Carrier` (rf_megatron.v1_packing) shared by the chunk's layers, handed to them through the layer
  spec (layer 1 writes V_1, layers >= 2 read it), cleared after every forward so no graph outlives its microbatch;
- pipeline parallelism: a stage's output is `cat(hidden, V_1)` and `set_input_tensor` splits it,
  so V_1 reaches every later stage and its gradient comes back (rf_megatron.v1_packing);
- full activation recompute: the block's hidden states carry V_1 (packed) through Megatron's
  checkpointed chunks; the final norm sees plain hidden states;
- the lambda mode's model-wide parameters (learnable_plus: the softmax logits and scale).
"""
from __future__ import annotations

import sys
from typing import List

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from .config import ModelConfig
from .cross_entropy import CompiledCrossEntropy
from .specs import block_spec
from .v1_packing import V1Carrier
from .value_residual import LayerLambdas, build_shared_lambdas


class GPTModelWithLossChoice(GPTModel):
    """Megatron's GPTModel with the loss parallel.cross_entropy chooses (rf_megatron/cross_entropy.py):
    `compiled` computes it with torch's compiled cross-entropy on one TP rank; with `compile_fallback` (the
    user said auto) a compiler that fails is said once and Megatron's loss used instead."""

    def __init__(self, *args, cross_entropy: str = "megatron", compile_fallback: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.compiled_loss = None
        if cross_entropy == "compiled":
            self.compiled_loss = CompiledCrossEntropy(
                fallback=self._megatron_loss if compile_fallback else None, warn=_warn_from_loss_stage)

    def compute_language_model_loss(self, labels, logits):
        """[b, s] labels, [s, b, vocab] logits -> [b, s] per-token loss (Megatron's contract)."""
        if self.compiled_loss is None:
            return super().compute_language_model_loss(labels, logits)
        return self.compiled_loss(logits, labels.transpose(0, 1)).transpose(0, 1)

    def _megatron_loss(self, logits, labels):
        """The compiled loss's signature ([s, b] labels, [s, b] loss) on Megatron's."""
        return super().compute_language_model_loss(labels.transpose(0, 1), logits).transpose(0, 1)


def _warn_from_loss_stage(msg: str) -> None:
    """Once per run: data-parallel rank 0 of the stage that computes the loss (rank 0 may hold no loss)."""
    if parallel_state.get_data_parallel_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


class ValueResidualGPTModel(GPTModelWithLossChoice):
    def __init__(self, *args, rf_config: ModelConfig, v1: V1Carrier, **kwargs):
        super().__init__(*args, **kwargs)
        self.v1 = v1  # the same carrier its layer spec handed to the layers
        # the mode's model-wide lambdas (learnable_plus: softmax logits and scale); the attribute name is the
        # checkpoint and HF weight-map prefix
        self.value_residual_plus = build_shared_lambdas(rf_config)
        if self.value_residual_plus is not None:
            self.value_residual_plus.to(self.config.params_dtype)
            vp_stage = kwargs.get("vp_stage")
            if parallel_state.get_pipeline_model_parallel_rank() != 0 or (vp_stage or 0) != 0:
                for p in self.value_residual_plus.parameters():
                    p.shared = True  # count the replicated copies once in the grad norm
        for module in self.decoder.modules():
            if isinstance(module, LayerLambdas) and self.value_residual_plus is not None:
                module.shared_of = self.value_residual_plus.values
        self.decoder.register_forward_pre_hook(self._pack_first_block_input, with_kwargs=True)
        if self.decoder.final_layernorm is not None:
            self.decoder.final_layernorm.register_forward_pre_hook(self._unpack_before_final_norm)

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs):
        """learnable_plus's logits live in every chunk of every stage: one main replica only."""
        state = super().sharded_state_dict(prefix, *args, **kwargs)
        if self.value_residual_plus is not None:
            vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
            copy = parallel_state.get_pipeline_model_parallel_rank() * vpp + (self.vp_stage or 0)
            for key, sharded in state.items():
                if key.startswith(f"{prefix}value_residual_plus."):
                    sharded.replica_id = (copy, *sharded.replica_id[1:]) if isinstance(
                        sharded.replica_id, tuple) else (copy, sharded.replica_id)
        return state

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        if input_tensor is not None and not self.v1.rides_in_hidden(self.training):
            input_tensor = self.v1.unpack(input_tensor)
        super().set_input_tensor(input_tensor)

    def forward(self, *args, **kwargs):
        try:
            output = super().forward(*args, **kwargs)
            if not self.post_process and not self.v1.rides_in_hidden(self.training):
                output = self.v1.pack(output)
            return output
        finally:
            self.v1.clear()

    def _pack_first_block_input(self, block, args, kwargs):
        """Full recompute on the first stage: give the embeddings an (empty) V_1 lane."""
        if self.v1.rides_in_hidden(self.training) and block.pre_process:
            kwargs["hidden_states"] = self.v1.empty_lane(kwargs["hidden_states"])
        return args, kwargs

    def _unpack_before_final_norm(self, norm, args):
        if self.v1.rides_in_hidden(self.training):
            return (self.v1.unpack(args[0]),) + tuple(args[1:])
        return None


def build_model_chunks(model_cfg: ModelConfig, config, transformer_impl: str = "local",
                       cross_entropy: str = "megatron", compile_fallback: bool = False) -> List[GPTModel]:
    """One GPT model per virtual pipeline stage on this rank (a single one without VPP); `cross_entropy` as
    rf_megatron.cross_entropy.resolve decided it."""
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        v1 = V1Carrier(config, parallel_state.get_tensor_model_parallel_world_size()) if model_cfg.value_residual else None
        kwargs = dict(
            config=config,
            transformer_layer_spec=block_spec(model_cfg, config, transformer_impl, vp_stage=vp_stage, v1=v1),
            vocab_size=model_cfg.vocab_size,
            max_sequence_length=model_cfg.seq_length,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=model_cfg.rotary_base,
            vp_stage=vp_stage,
            cross_entropy=cross_entropy,
            compile_fallback=compile_fallback,
        )
        if model_cfg.value_residual:
            chunks.append(ValueResidualGPTModel(rf_config=model_cfg, v1=v1, **kwargs))
        else:
            chunks.append(GPTModelWithLossChoice(**kwargs))
    return chunks


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
