"""Attention concentration of a trained model, per layer: the paper's evidence that value
residual keeps attention from collapsing onto the first token (arXiv 2410.17897, §3).

- attention entropy: -sum_j p_ij log p_ij, mean over heads, sequences and query positions
  i >= 1 (position 0 sees only itself); also divided by log(i + 1), the entropy of uniform
  attention over the visible keys (1 = uniform, 0 = one key);
- first-token mass: p_i0, the attention on the first token (the "attention sink"), same mean;
  and its largest per-head mean;
- hidden-state similarity: mean pairwise cosine similarity of the token vectors of a sequence,
  after the embedding (layer 0) and after every layer (over-smoothing / representation collapse).

How probabilities are captured: a forward pre-hook on each layer's `core_attention` receives the
query and key exactly as the attention kernel does (after the QKV projection, q/k layernorm and
RoPE), and the probabilities are recomputed as softmax(scale * QK^T) under the causal mask. This
does not depend on how the kernel computes them (the local kernel, Transformer Engine's fused
or flash kernels never expose them) nor on re-implementing RoPE. It is checked on every batch:
probabilities x V must reproduce the kernel's own output (`recompute_max_err`).

Loading: one process, CPU, gloo, TP1 PP1, fp32 (bf16 checkpoints are cast on load); the model is
built from the checkpoint's own `run_config.yaml` and filled by `dist_checkpointing.load` with the
model's sharded state dict.
Sharded keys are layout independent, so checkpoints saved under TP/PP/VPP layouts load the same;
StrictHandling.RAISE_UNEXPECTED makes a model key missing from the checkpoint an error naming it,
while the checkpoint's optimizer / RNG / scheduler entries are simply not read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

METRICS = ("attn_entropy", "attn_entropy_norm", "first_token_mass", "first_token_mass_max_head",
           "hidden_cosine_sim")


def resolve_iter_dir(path) -> Path:
    """A checkpoint root (with `latest`) or an `iter_NNNNNNN` directory -> the iteration directory."""
    from ..checkpoint_dir import CheckpointError, resolve_iteration

    try:
        return resolve_iteration(path)
    except CheckpointError as exc:
        raise FileNotFoundError(str(exc)) from None  # tools/analyze_attention.py: a user error, one line


def init_single_process(seed: int = 1234) -> None:
    """The device (a GPU when there is one, rf_megatron.device), a 1-rank process group and Megatron's TP1 PP1
    groups (idempotent)."""
    import socket

    import torch.distributed as dist

    from ..device import init_process_group, select_device

    select_device()
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_process_group(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def load_model(checkpoint):
    """(GPTModel in eval mode, fp32, TP1 PP1; RunConfig) from a Megatron checkpoint."""
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from ..checkpointing import load_single_model
    from ..config import ParallelConfig
    from ..device import on_gpu
    from ..run_config import load_run_config

    iter_dir = resolve_iter_dir(checkpoint)
    cfg = load_run_config(str(iter_dir / "run_config.yaml"))
    if cfg.parallel.transformer_impl != "local":
        raise NotImplementedError(f"{iter_dir}: transformer_impl={cfg.parallel.transformer_impl} checkpoints name "
                                  "their norms differently from the local (CPU) spec; only local checkpoints load here")
    cfg.parallel = ParallelConfig()  # TP1 PP1, fp32, no SP / recompute
    init_single_process(cfg.train.seed)
    return load_single_model(iter_dir, cfg.model, cpu=not on_gpu(), strict=StrictHandling.RAISE_UNEXPECTED), cfg


def text_batch(tokenizer, text: str, seq_length: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows of `seq_length` tokens from `text`: [windows, seq_length]."""
    ids = tokenizer.tokenize(text)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens")
    if len(ids) < seq_length:
        return torch.tensor([ids])
    n = min(max_windows, len(ids) // seq_length)
    return torch.tensor(ids[:n * seq_length]).view(n, seq_length)


@dataclass
class _Capture:
    qk: Dict[int, tuple] = field(default_factory=dict)
    out: Dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: Dict[int, torch.Tensor] = field(default_factory=dict)


def _probs(query, key, scale):
    """softmax(scale * q k^T) under the causal mask: [b, heads, sq, sk] (GQA keys repeated)."""
    q = query.float().permute(1, 2, 0, 3)  # [b, np, s, d]
    k = key.float().permute(1, 2, 0, 3)  # [b, ng, s, d]
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = scores.size(-1)
    mask = torch.ones(s, s, dtype=torch.bool, device=scores.device).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)


def _cosine_similarity(hidden):
    """Mean off-diagonal cosine similarity between the token vectors of each sequence."""
    x = torch.nn.functional.normalize(hidden.float().transpose(0, 1), dim=-1)  # [b, s, h]
    s = x.size(1)
    if s < 2:
        return float("nan")
    sim = torch.matmul(x, x.transpose(1, 2))
    off = sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)
    return float((off / (s * (s - 1))).mean())


@torch.no_grad()
def analyse(model, tokens: torch.Tensor) -> Dict[str, object]:
    """Per-layer metrics (list of dicts), the LM loss on `tokens`, and the recompute check."""
    from ..data import causal_mask

    cap = _Capture()
    handles = []
    layers = list(model.decoder.layers)
    for layer in layers:
        n = layer.layer_number
        core = layer.self_attention.core_attention

        def pre(module, args, kwargs, n=n):
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            cap.qk[n] = (q.detach(), k.detach(), v.detach())

        def post(module, args, kwargs, output, n=n):
            cap.out[n] = (output[0] if isinstance(output, tuple) else output).detach()

        def hidden(module, args, output, n=n):
            cap.hidden[n] = (output[0] if isinstance(output, tuple) else output).detach()

        handles += [core.register_forward_pre_hook(pre, with_kwargs=True),
                    core.register_forward_hook(post, with_kwargs=True),
                    layer.register_forward_hook(hidden)]
    handles.append(model.embedding.register_forward_hook(lambda m, a, out: cap.hidden.__setitem__(0, out.detach())))
    try:
        tokens = tokens.to(model.embedding.word_embeddings.weight.device)
        b, s = tokens.shape
        position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
        logits = model(tokens, position_ids, causal_mask(s).to(tokens.device))
    finally:
        for h in handles:
            h.remove()
    logits = logits.float()
    if logits.shape[0] != b:  # [s, b, V] in some versions
        logits = logits.transpose(0, 1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    rows, max_err = [{"layer": 0, "hidden_cosine_sim": _cosine_similarity(cap.hidden[0])}], 0.0
    for layer in layers:
        n = layer.layer_number
        q, k, v = cap.qk[n]
        core = layer.self_attention.core_attention
        scale = getattr(core, "softmax_scale", None) or 1.0 / math.sqrt(q.size(-1))
        p = _probs(q, k, scale)  # [b, np, s, s]
        vv = v.float().permute(1, 2, 0, 3)
        if vv.size(1) != p.size(1):
            vv = vv.repeat_interleave(p.size(1) // vv.size(1), dim=1)
        context = torch.matmul(p, vv).permute(2, 0, 1, 3).reshape(s, b, -1)
        max_err = max(max_err, float((context - cap.out[n].float().reshape(s, b, -1)).abs().max()))
        rest = p[:, :, 1:, :]  # queries i >= 1
        ent = -(rest * torch.log(rest.clamp_min(1e-30))).sum(-1)  # [b, np, s-1]
        visible = torch.log(torch.arange(2, s + 1, dtype=torch.float32, device=ent.device))  # log(i + 1), i = 1..s-1
        first = rest[..., 0]  # [b, np, s-1]
        rows.append({"layer": n, "attn_entropy": float(ent.mean()), "attn_entropy_norm": float((ent / visible).mean()),
                     "first_token_mass": float(first.mean()),
                     "first_token_mass_max_head": float(first.mean(dim=(0, 2)).max()),
                     "hidden_cosine_sim": _cosine_similarity(cap.hidden[n])})
    return {"layers": rows, "loss": float(loss), "recompute_max_err": max_err, "tokens": int(tokens.numel())}


def analyse_checkpoint(checkpoint, text: str, max_windows: int = 16, seq_length: Optional[int] = None,
                       tokenizer_model: Optional[str] = None) -> Dict[str, object]:
    from ..tokenizer import SentencePieceTokenizer

    model, cfg = load_model(checkpoint)
    tok_path = tokenizer_model or cfg.data.tokenizer_model
    if tok_path and not Path(tok_path).is_absolute() and not Path(tok_path).exists():
        tok_path = str(Path(__file__).resolve().parents[2] / tok_path)  # presets are relative to the repo
    tokenizer = SentencePieceTokenizer(tok_path)
    tokens = text_batch(tokenizer, text, min(seq_length or cfg.model.seq_length, cfg.model.seq_length), max_windows)
    result = analyse(model, tokens)
    m = cfg.model
    result.update({"checkpoint": str(resolve_iter_dir(checkpoint)), "name": cfg.name, "variant": m.variant,
                   "lambda_mode": m.lambda_mode if m.variant == "resformer" else None,
                   "num_layers": m.num_layers, "hidden_size": m.hidden_size})
    return result


def table(results: Dict[str, Dict[str, object]]):
    """One row per (model label, layer)."""
    import pandas as pd

    rows = [{"model": label, **row} for label, res in results.items() for row in res["layers"]]
    return pd.DataFrame(rows, columns=["model", "layer", *METRICS])


def plot(df, out) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("attn_entropy_norm", "attention entropy / log(#visible keys)"),
              ("first_token_mass", "attention mass on the first token"),
              ("hidden_cosine_sim", "mean pairwise cosine similarity of hidden states")]
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (col, title) in zip(axes, panels):
        for label, g in df.groupby("model", sort=False):
            g = g.dropna(subset=[col])
            ax.plot(g["layer"], g[col], marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("layer (0 = embeddings)" if col == "hidden_cosine_sim" else "layer")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
