"""Helpers of tests/gpu/device_check.sh (no internet on a GPU box): a synthetic corpus, and the closing table.

    python tests/gpu/device_check.py corpus OUT_DIR [--documents N]
    python tests/gpu/device_check.py table RUNS_DIR vanilla resformer_identity ...
"""
import argparse
import json
import math
import random
import sys
from pathlib import Path


def corpus(out: Path, documents: int) -> None:
    """JSONL of documents over a 3000-word pseudo-lexicon with Zipf frequencies and a first-order Markov
    structure, so that a model has something to learn in 40 steps (random tokens would keep loss at log V)."""
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ch", "st", "qu"]
    lexicon = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(4000)})[:3000]
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    follow = {w: rng.choices(lexicon, weights, k=8) for w in lexicon}  # each word prefers 8 successors
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w") as f:
        for _ in range(documents):
            word, words = rng.choices(lexicon, weights)[0], []
            for _ in range(rng.randint(200, 800)):
                words.append(word)
                word = rng.choice(follow[word]) if rng.random() < 0.8 else rng.choices(lexicon, weights)[0]
            f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")


def table(runs: Path, names) -> int:
    """One row per run from its metrics.jsonl: the last log window's tokens/s and MFU (the first windows hold
    compilation and warm-up), peak memory, final losses, tokens/s relative to the first run."""
    rows = []
    for name in names:
        path = runs / name / "metrics.jsonl"
        if not path.is_file():
            rows.append((name, None))
            continue
        records = [json.loads(line) for line in open(path)]
        train = [r for r in records if "tokens_per_s" in r]
        valid = [r for r in records if "valid_loss" in r]
        rows.append((name, {**train[-1], "valid_loss": valid[-1]["valid_loss"] if valid else math.nan}) if train
                    else (name, None))
    base = rows[0][1]["tokens_per_s"] if rows and rows[0][1] else None
    print(f"{'run':<22} {'tokens/s':>10} {'vs ' + rows[0][0]:>16} {'MFU':>7} {'TFLOP/s':>8} {'peak alloc':>11} "
          f"{'peak resv':>10} {'loss':>7} {'valid':>7}")
    failed = 0
    for name, r in rows:
        if r is None:
            print(f"{name:<22} FAILED (no metrics; see its log)")
            failed += 1
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        rel = f"{r['tokens_per_s'] / base:.3f}x" if base else "n/a"
        print(f"{name:<22} {r['tokens_per_s']:>10,.0f} {rel:>16} {mfu:>7} {r['tflops_per_device']:>8.1f} "
              f"{r.get('peak_mem_allocated_gib', math.nan):>9.2f}Gi {r.get('peak_mem_reserved_gib', math.nan):>8.2f}Gi "
              f"{r['loss']:>7.3f} {r['valid_loss']:>7.3f}")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("out", type=Path)
    c.add_argument("--documents", type=int, default=3000)
    t = sub.add_parser("table")
    t.add_argument("runs", type=Path)
    t.add_argument("names", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "corpus":
        corpus(args.out, args.documents)
        return 0
    return table(args.runs, args.names)


if __name__ == "__main__":
    sys.exit(main())
