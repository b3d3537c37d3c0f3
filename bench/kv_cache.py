"""KV-cache bytes and decode speed: SVFormer (rf_megatron.hf, SharedValueCache) vs vanilla Llama.

    python bench/kv_cache.py                                  # the paper's 82M shape, CPU, fp32
    python bench/kv_cache.py --layers 24 --hidden 1024 --heads 16 --ffn 3584 --dtype bf16

Both models get the same shape (layers, hidden, heads, KV heads, FFN, vocab) and random weights;
each runs the same prompt and greedy generation through `generate()`. Reported: the bytes of tensor
storage the final cache holds (Llama: DynamicCache, L layers of K and V; SVFormer: L layers of K
plus ONE layer of V, theory (L+1)/(2L)), and decode tokens/s (generate(N) minus generate(1), i.e.
without the prefill; median over alternating rounds so that machine load hits both alike).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def build(args, variant: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rf_megatron.hf.configuration_rfgpt import RFGPTConfig
    from rf_megatron.hf.modeling_rfgpt import RFGPTForCausalLM

    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=args.prompt + args.new,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None,
                 eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    if variant == "vanilla":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        model = RFGPTForCausalLM(RFGPTConfig(variant=variant, **shape))
    return model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]).eval()


def generate(model, prompt, new_tokens: int):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, return_dict_in_generate=True, pad_token_id=0)


def timed(model, prompt, new_tokens: int) -> float:
    start = time.perf_counter()
    generate(model, prompt, new_tokens)
    return time.perf_counter() - start


def _round3(x: float) -> str:
    """0.5625 -> '0.563' (half up; format() would round half to even: '0.562')."""
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(repr(x)).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (multi-head attention)")
    p.add_argument("--ffn", type=int, default=1792)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32, help="tokens generated")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per model (0: bytes only)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from rf_megatron.hf.modeling_rfgpt import CACHE_ARG, SharedValueCache, cache_nbytes

    hf_logging.set_verbosity_error()
    models = {name: build(args, name) for name in ("vanilla", "svformer")}
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    nbytes, cached_tokens = {}, {}
    for name, model in models.items():
        cache = getattr(generate(model, prompt, args.new), CACHE_ARG)
        if name == "svformer":
            assert isinstance(cache, SharedValueCache), type(cache)
        nbytes[name], cached_tokens[name] = cache_nbytes(cache), cache.get_seq_length()
        if cached_tokens[name] != args.prompt + args.new - 1:  # a cache rebuilt each step holds 1 token
            raise SystemExit(f"error: {name}'s cache holds {cached_tokens[name]} tokens after generate(), "
                             f"expected {args.prompt + args.new - 1}")
    decode = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():  # alternate, so drift in machine load hits both
            seconds = timed(model, prompt, args.new) - timed(model, prompt, 1)
            decode[name].append(args.batch * (args.new - 1) / max(seconds, 1e-9))

    L = args.layers
    print(f"shape: {L} layers, hidden {args.hidden}, {args.heads} heads, {args.kv_heads or args.heads} KV heads, "
          f"batch {args.batch}, prompt {args.prompt} + {args.new} generated, {args.dtype}")
    for name in models:
        speed = f", decode {statistics.median(decode[name]):,.1f} tok/s" if decode[name] else ""
        print(f"{name:<8} KV cache {nbytes[name] / 2**20:8.3f} MiB{speed}")
    ratio = nbytes["svformer"] / nbytes["vanilla"]
    print(f"svformer {_round3(ratio)}x  (theory (L+1)/(2L) = {(L + 1) / (2 * L):.4f})")
    result = {"bytes": nbytes, "ratio": ratio, "theory": (L + 1) / (2 * L), "cached_tokens": cached_tokens}
    if args.rounds:
        speed_ratio = statistics.median(decode["svformer"]) / statistics.median(decode["vanilla"])
        print(f"decode tokens/s svformer/vanilla {_round3(speed_ratio)}x")
        result["decode_ratio"] = speed_ratio
    return result


if __name__ == "__main__":
    main()
