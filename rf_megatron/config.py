"""One dataclass tree describes a run's model and its parallel layout.

`ModelConfig.validate(parallel)` checks everything a user can get wrong *before* any process group
exists, with one-line messages naming the option; `build_transformer_config` turns the tree into
Megatron-Core's `TransformerConfig`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from .errors import ConfigError  # noqa: F401  (re-exported: the config's own error)
from .value_residual_spec import MODES, config_problem
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_BACKENDS = ("auto", "sdpa", "unfused", "te")
CROSS_ENTROPY = ("auto", "megatron", "megatron_fused", "compiled")  # rf_megatron/cross_entropy.py
INITS = ("megatron", "paper")


@dataclass
class ModelConfig:
    """A Llama-style decoder plus the value-residual choice (docs/architecture.md §1)."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (one KV head per head)
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    # None: the tokenizer's vocabulary (data.tokenizer_model) padded up to a multiple of
    # make_vocab_size_divisible_by x tensor_parallel, filled in when the run config is loaded (rf_megatron/vocab.py);
    # a run config's default (run_config.RUN_DEFAULTS), while a bare ModelConfig (tests, tools) has a number
    vocab_size: Optional[int] = 256
    make_vocab_size_divisible_by: int = 128  # Megatron-LM's --make-vocab-size-divisible-by
    seq_length: int = 32
    normalization: str = "RMSNorm"
    swiglu: bool = True
    qk_layernorm: bool = False
    init_method_std: float = 0.02
    # initial weights: megatron (N(0, init_method_std), output projections linear_proj / linear_fc2 scaled by
    # 1/sqrt(2 num_layers)) | paper (the released code's Hugging Face Llama init: N(0, init_method_std) everywhere)
    init: str = "megatron"
    untie_embeddings_and_output_weights: bool = True
    rotary_base: int = 10000
    layernorm_epsilon: float = 1e-5
    # core attention kernel (same math): auto (te with transformer_impl=transformer_engine, else sdpa) | sdpa
    # (PyTorch's scaled_dot_product_attention) | unfused (Megatron's DotProductAttention) | te (Transformer Engine)
    attention_backend: str = "auto"
    # value residual (arXiv 2410.17897)
    variant: str = "resformer"  # vanilla | resformer | svformer
    lambda_mode: str = "identity"  # ResFormer: identity | constant | learnable | learnable_plus | sparse
    lambda_constant: float = 2.0  # `constant`: V'_n = V_n + lambda_constant * V_1
    sparse_layers: Optional[List[int]] = None  # `sparse`: 1-based layers that mix in V_1 (None: the last half)

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """The FFN width: ffn_hidden_size, or 4 x hidden_size when it is not set."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def value_residual(self) -> bool:
        return self.variant != "vanilla"

    def validate(self, parallel: "ParallelConfig") -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        problem = config_problem(self.variant, self.lambda_mode, self.num_layers, self.sparse_layers)
        need(problem is None, problem)  # the value-residual choice: one set of rules, also read by the HF config
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                     "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name}={value} must be positive")  # None: vocab_size from data
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        need(self.num_attention_heads % self.kv_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not divisible by num_query_groups={self.kv_heads}")
        need(self.normalization in ("RMSNorm", "LayerNorm"),
             f"normalization={self.normalization!r}: choose RMSNorm or LayerNorm")
        need(self.init in INITS, f"init={self.init!r}: choose one of {', '.join(INITS)}")
        need(self.attention_backend in ATTENTION_BACKENDS,
             f"attention_backend={self.attention_backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
        need(self.attention_backend != "te" or parallel.transformer_impl == "transformer_engine",
             "attention_backend=te needs parallel.transformer_impl=transformer_engine")
        tp, pp, vpp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.virtual_pipeline_parallel
        need(self.num_attention_heads % tp == 0,
             f"tensor_parallel={tp} does not divide num_attention_heads={self.num_attention_heads}")
        need(self.vocab_size is None or self.vocab_size % tp == 0,  # None: resolved later, padded to fit TP
             f"tensor_parallel={tp} does not divide vocab_size={self.vocab_size}")
        need(self.num_layers % (pp * (vpp or 1)) == 0,
             f"num_layers={self.num_layers} is not divisible by pipeline_parallel*virtual_pipeline_parallel={pp * (vpp or 1)}")
        if parallel.sequence_parallel:
            need(tp > 1, "sequence_parallel=true needs tensor_parallel > 1")
            need(self.seq_length % tp == 0, f"sequence_parallel: tensor_parallel={tp} does not divide seq_length={self.seq_length}")
        if not self.value_residual:
            return
        need(self.kv_heads % tp == 0,
             f"tensor_parallel={tp} does not divide num_query_groups={self.kv_heads}: value residual needs every "
             "TP rank to own whole KV heads")
        if MODES[self.lambda_mode].model_params and (pp > 1 or vpp):
            need(not parallel.overlap_grad_reduce,
                 f"lambda_mode={self.lambda_mode} shares its model-wide lambdas across pipeline stages: set "
                 "overlap_grad_reduce=false")
        need(parallel.context_parallel == 1, "context_parallel > 1 is not supported with value residual yet")
        need(parallel.recompute_granularity in (None, "selective", "full"),
             f"recompute_granularity={parallel.recompute_granularity!r}: choose selective, full or null")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    context_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    recompute_granularity: Optional[str] = None  # None | selective | full
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    params_dtype: str = "fp32"  # fp32 | bf16 | fp16
    fp8: Optional[str] = None  # "hybrid" | "e4m3" on H100 with Transformer Engine
    transformer_impl: str = "local"  # local | transformer_engine
    fusions: bool = True  # on a GPU, Megatron's fused kernels where they exist (gpu_fusions); false to debug one
    # the loss (rf_megatron/cross_entropy.py): auto (torch's cross-entropy under torch.compile on a GPU at TP1,
    # else megatron) | megatron (vocab_parallel_cross_entropy) | megatron_fused (Megatron's native fused kernel,
    # bf16 only: its backward returns bf16 logits gradients) | compiled (TP1)
    cross_entropy: str = "auto"
    # torch.compile of every transformer layer (rf_megatron/layer_compile.py; local spec): inductor fuses the
    # norms, RoPE, the value mix, SwiGLU and the residual adds around the matmuls and attention
    compile_layers: bool = False

    def validate(self, world_size: Optional[int] = None) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        if self.virtual_pipeline_parallel is not None:
            need(self.pipeline_parallel > 1 and self.virtual_pipeline_parallel >= 2,
                 "virtual_pipeline_parallel needs pipeline_parallel > 1 and a value >= 2")
        need(self.params_dtype in DTYPES, f"params_dtype={self.params_dtype!r}: choose one of {', '.join(DTYPES)}")
        need(self.transformer_impl in ("local", "transformer_engine"),
             f"transformer_impl={self.transformer_impl!r}: choose local or transformer_engine")
        need(self.fp8 is None or self.transformer_impl == "transformer_engine",
             "fp8 needs transformer_impl=transformer_engine (Transformer Engine on an H100)")
        need(self.cross_entropy in CROSS_ENTROPY,
             f"cross_entropy={self.cross_entropy!r}: choose one of {', '.join(CROSS_ENTROPY)}")
        need(self.cross_entropy != "megatron_fused" or self.params_dtype == "bf16",
             f"cross_entropy=megatron_fused needs params_dtype=bf16 (Megatron's fused cross-entropy returns bf16 "
             f"gradients of the logits; with {self.params_dtype} they would be silently rounded)")
        need(self.cross_entropy != "compiled" or self.tensor_parallel == 1,
             f"cross_entropy=compiled needs tensor_parallel=1 (the vocabulary split over {self.tensor_parallel} "
             "ranks needs megatron or megatron_fused)")
        need(not self.compile_layers or self.transformer_impl == "local",
             "compile_layers needs transformer_impl=local (Transformer Engine's modules are not compiled here)")
        need(not (self.compile_layers and self.recompute_granularity == "selective"),
             "compile_layers with recompute_granularity=selective: Megatron's recomputed core attention breaks every "
             "compiled layer in pieces, and SDPA keeps no [s, s] scores to save; use full recompute or none")
        need(self.recompute_method in ("uniform", "block"),
             f"recompute_method={self.recompute_method!r}: choose uniform or block")
        if world_size is not None:
            mp = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
            need(world_size % mp == 0,
                 f"world size {world_size} is not divisible by tensor_parallel*pipeline_parallel*context_parallel={mp}")


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def gpu_fusions(parallel: ParallelConfig) -> dict:
    """The fusions Megatron-LM turns on by default on a GPU, each where its kernel exists (all off on CPU):
    - bias + SwiGLU/GeLU: Megatron's own jit-fused functions (need only torch);
    - masked softmax (the local spec's unfused attention): Megatron/apex's `scaled_upper_triang_masked_softmax_cuda`;
    - gradient-accumulation fusion: apex's `fused_weight_gradient_mlp_cuda` (Megatron needs it for its output
      layer even on the TE spec);
    - RoPE: Transformer Engine's fused kernel on separate Q/K is fine with value residual; only the fused
      single-QKV kernel (`fused_single_qkv_rope`, never exposes V) is refused (rf_megatron.attention);
    - persistent layer norm: used by apex's FusedLayerNorm only, harmless elsewhere (Megatron-LM's default)."""
    te = parallel.transformer_impl == "transformer_engine"
    rope = False
    if te:
        from megatron.core.models.common.embeddings import rope_utils

        rope = getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None
    return dict(
        bias_activation_fusion=True,
        masked_softmax_fusion=te or _importable("scaled_upper_triang_masked_softmax_cuda"),
        # apex's kernel writes main_grad from inside the backward: kept out of compiled layers
        gradient_accumulation_fusion=_importable("fused_weight_gradient_mlp_cuda") and not parallel.compile_layers,
        apply_rope_fusion=rope,
        persist_layer_norm=True,
    )


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig, cpu: bool = False):
    """Megatron-Core TransformerConfig for this model and layout (validated first). `cpu=False` is the GPU
    path: parameters initialised on the device, Megatron's fusions on (gpu_fusions)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from .device import backend, simulated

    parallel.validate()
    model.validate(parallel)
    if model.vocab_size is None:
        raise ConfigError("model.vocab_size is not set (a run config takes it from data.tokenizer_model)")
    dtype = DTYPES[parallel.params_dtype]
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=torch.nn.functional.silu if model.swiglu else torch.nn.functional.gelu,
        add_bias_linear=False,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=parallel.fp8,
        recompute_granularity=parallel.recompute_granularity,
        recompute_method=parallel.recompute_method if parallel.recompute_granularity == "full" else None,
        recompute_num_layers=parallel.recompute_num_layers if parallel.recompute_granularity == "full" else None,
        use_cpu_initialization=cpu,
        cross_entropy_loss_fusion=parallel.cross_entropy == "megatron_fused",
        cross_entropy_fusion_impl="native",
        **(gpu_fusions(parallel) if parallel.fusions and not cpu and not simulated() else {}),
    )
    if model.init == "paper":  # no 1/sqrt(2L) on linear_proj / linear_fc2 (Megatron's default when left None)
        from megatron.core.utils import init_method_normal

        kwargs["output_layer_init_method"] = init_method_normal(model.init_method_std)
    if cpu or backend() == "gloo":
        # gloo: the interleaved schedule's batched p2p gives wrong results (docs/architecture.md §5)
        kwargs["batch_p2p_comm"] = False
    if model.value_residual and parallel.virtual_pipeline_parallel:  # V_1 widens the stage-to-stage tensor
        from .v1_packing import interleaved_schedule_options

        kwargs.update(interleaved_schedule_options())
    return TransformerConfig(**kwargs)


def replace(cfg, **changes):
    """dataclasses.replace that reports unknown keys as ConfigError."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ConfigError(f"unknown {type(cfg).__name__} option(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **changes)


@dataclass
class OptimConfig:
    """AdamW with the paper's defaults (0.9/0.95, wd 0.1, lr 6e-4 -> 6e-5 cosine, clip 1.0)."""

    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 100
    lr_decay_style: str = "cosine"  # cosine | WSD | linear | constant
    lr_wsd_decay_steps: Optional[int] = None  # WSD: length of the final decay phase
    # torch's fused AdamW kernel where Megatron falls back to torch's AdamW (no Apex / Transformer Engine):
    # None: on a GPU; true / false: wherever the kernel exists / never (rf_megatron/step_kernels.py)
    fused: Optional[bool] = None

    def validate(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"optim.{name}={value} must be a finite number >= 0")
        if not (self.adam_beta1 < 1 and self.adam_beta2 < 1):
            raise ConfigError(f"optim: adam_beta1 ({self.adam_beta1}) and adam_beta2 ({self.adam_beta2}) must be < 1")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"optim.lr_warmup_steps={self.lr_warmup_steps} must be >= 0")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim: need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr}) and lr > 0")
        if self.lr_decay_style not in ("cosine", "WSD", "linear", "constant"):
            raise ConfigError(f"lr_decay_style={self.lr_decay_style!r}: choose cosine, WSD, linear or constant")
