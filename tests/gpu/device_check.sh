#!/bin/bash
# One-shot check on ONE H100/H200 with no internet (issue #12): Python 3.12, torch, transformers and sentencepiece
# installed, megatron-core not. About 12 minutes in all (an estimate: no GPU has run the
# compiled rows yet), in two calls of RF_CHECK_PARTS below:
#   1. megatron-core from the wheels in tests/gpu/wheels/ (git-ignored, <= 64 MiB; tests/gpu/README.md says how
#      to fill it; Transformer Engine does not fit, so its tests skip here)
#   1b. bench/throughput.py at the resformer_82m shape, its table first: the Megatron engine (sdpa and unfused
#      attention; vanilla also with one step option changed per row, compiled layers among them) next to our HF
#      model in a plain PyTorch loop (SDPA, and torch.compile), tokens/s, MFU, memory (RF_CHECK_BENCH_ARGS replaces
#      its arguments); then vanilla at resformer_468m, eager and with compiled layers, the Megatron engine's MFU
#      there (about two minutes; RF_CHECK_BENCH_468M=0 skips it)
#   2. pytest tests/gpu (GPU-vs-CPU logits parity of every variant, fp32 and bf16; TE / DeepSpeed skip if absent)
#   3. a synthetic corpus (no downloads), then 40 bf16 steps of vanilla, ResFormer identity, ResFormer learnable
#      and SVFormer at the resformer_82m shape (seq 2048) through the real entry point
#   4. one table: tokens/s (and relative to vanilla), MFU, TFLOP/s, peak memory, final train / validation loss
#   5. bench/value_residual_overhead.py at that shape: step time of each variant relative to vanilla, alternating
#   6. RF_CHECK_QUALITY=1 (after the steps above) or =only (instead of 1b-5): bench/quality.py's GPU preset, vanilla /
#      ResFormer identity / SVFormer x RF_CHECK_QUALITY_SEEDS (1) at the resformer_82m shape in bf16, what fits
#      RF_CHECK_QUALITY_MINUTES (2) of training each, on the English corpus in RF_CHECK_QUALITY_DATA (data/english:
#      tools/build_english_corpus.py, carried), the held-out set scored whole; RF_CHECK_QUALITY_ARGS is appended.
#      About 8.5 minutes with =only (tests/gpu/README.md)
# RF_CHECK_PARTS (default bench,pytest,train,overhead: 1b / 2 / 3-4 / 5) runs only the parts named: the whole
#   check takes longer than one 10-minute device call, so a session runs RF_CHECK_PARTS=bench (about 6 minutes) and
#   RF_CHECK_PARTS=pytest,train,overhead (about 6) as two calls (tests/gpu/README.md).
# RF_CHECK_OVERRIDES="key=value ..." is appended to every training command (e.g. parallel.fusions=false).
# DRY_RUN=1 does all of it on a CPU machine: the simulated GPU (RF_MEGATRON_CPU=simulate-gpu), a tiny shape, 2 steps.
#   bash tests/gpu/device_check.sh            RF_CHECK_OUT=DIR also copies the logs there (device_check_logs.tgz)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
WHEELS=${RF_GPU_WHEELS:-$REPO/tests/gpu/wheels}
WORK=${RF_CHECK_DIR:-/tmp/rf-device-check}
DRY=${DRY_RUN:-0}
QUALITY=${RF_CHECK_QUALITY:-0}
case "$QUALITY" in 0|1|only) ;; *) echo "error: RF_CHECK_QUALITY=$QUALITY: 0, 1 or only"; exit 2;; esac
PARTS=${RF_CHECK_PARTS:-bench,pytest,train,overhead}
for p in ${PARTS//,/ }; do
  case "$p" in bench|pytest|train|overhead) ;; *) echo "error: RF_CHECK_PARTS=$PARTS: $p is not one of bench, pytest, train, overhead"; exit 2;; esac
done
part() { [[ ",$PARTS," == *",$1,"* ]]; }
QDATA=${RF_CHECK_QUALITY_DATA:-$REPO/data/english}
T0=$SECONDS
say() { echo "== [$((SECONDS - T0)) s] $*"; }
rm -rf "$WORK" && mkdir -p "$WORK/runs" || exit 2

if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  say "installing megatron-core from $WHEELS"
  compgen -G "$WHEELS/*.whl" >/dev/null || { echo "error: megatron-core is not installed and $WHEELS holds no wheels (tests/gpu/README.md)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if [ "$DRY" = 1 ]; then
  export RF_MEGATRON_CPU=simulate-gpu
  SHAPE="model.num_layers=2 model.hidden_size=64 model.num_attention_heads=2 model.ffn_hidden_size=128 model.seq_length=128 model.vocab_size=4096"
  STEPS=2; WARMUP=1; BATCH="train.global_batch_size=4 train.micro_batch_size=2 train.log_interval=1"; DOCS=200
else
  unset RF_MEGATRON_CPU
  SHAPE=""; STEPS=${RF_CHECK_STEPS:-40}; WARMUP=10; BATCH="train.global_batch_size=64 train.micro_batch_size=8 train.log_interval=10"; DOCS=3000
fi

say "environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -W ignore - <<'PY'
import torch, megatron.core, transformers
print(f"python torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY

PYTEST_RC=0; TABLE_RC=0; QUALITY_RC=0; BENCH_RC=0; NAMES=()
if [ "$QUALITY" != only ]; then  # steps 1b-5
if part bench; then
say "bench/throughput.py: the Megatron engine next to the HF model in a plain PyTorch loop, alternating steps"
if [ "$DRY" = 1 ]; then THROUGHPUT="--shape tiny --warmup 0 --rounds 1"
else THROUGHPUT=${RF_CHECK_BENCH_ARGS:---shape resformer_82m --compile}; fi
RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29500 + RANDOM % 1000)) \
  timeout "${RF_CHECK_BENCH_TIMEOUT:-480}" "$PY" -W ignore bench/throughput.py $THROUGHPUT > "$WORK/throughput.log" 2>&1 ||
  { BENCH_RC=$?; echo "throughput bench failed (exit $BENCH_RC):"; tail -15 "$WORK/throughput.log"; }
grep -E "^(#|\||Megatron )" "$WORK/throughput.log"
if [ "$DRY" != 1 ] && [ "${RF_CHECK_BENCH_468M:-1}" = 1 ]; then  # issue #28's MFU figure, about two minutes
  say "bench/throughput.py at resformer_468m: the Megatron engine's MFU (vanilla, sdpa) next to the HF model"
  RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29500 + RANDOM % 1000)) \
    timeout 300 "$PY" -W ignore bench/throughput.py --shape resformer_468m --variants vanilla --backends sdpa --compile-layers \
    --no-ablations --warmup 2 --rounds 3 > "$WORK/throughput_468m.log" 2>&1 ||
    { BENCH_RC=$?; echo "throughput bench (468M) failed (exit $BENCH_RC):"; tail -15 "$WORK/throughput_468m.log"; }
  grep -E "^(#|\||Megatron )" "$WORK/throughput_468m.log"
fi
fi

if part pytest; then
say "pytest tests/gpu"
"$PY" -m pytest -q -s -p no:cacheprovider tests/gpu -rs > "$WORK/pytest.log" 2>&1
PYTEST_RC=$?
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|skipped|error|^peak above the inputs|: logits vs fp32 " "$WORK/pytest.log" | tail -20
fi

if part train; then
say "synthetic corpus ($DOCS documents) -> tokenizer -> indexed dataset"
D=$WORK/data
"$PY" tests/gpu/device_check.py corpus "$D" --documents "$DOCS" &&
  "$PY" tools/train_tokenizer.py --input "$D/corpus.jsonl" --vocab-size 4000 --max-sentences 3000 --output-prefix "$D/tok" >"$WORK/data.log" 2>&1 &&
  "$PY" tools/preprocess_data.py --input "$D/corpus.jsonl" --tokenizer-model "$D/tok.model" --output-prefix "$D/corpus" --workers 8 >>"$WORK/data.log" 2>&1 ||
  { tail -20 "$WORK/data.log"; echo "error: could not build the corpus"; exit 1; }

RUNS=("vanilla model.variant=vanilla"
      "resformer_identity model.variant=resformer model.lambda_mode=identity"
      "resformer_learnable model.variant=resformer model.lambda_mode=learnable"
      "svformer model.variant=svformer")
NAMES=()
for spec in "${RUNS[@]}"; do
  name=${spec%% *}; NAMES+=("$name")
  say "train $name: $STEPS steps, bf16, resformer_82m shape ${SHAPE:+(dry run: tiny shape)}"
  RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29500 + RANDOM % 1000)) \
  timeout "${RF_CHECK_RUN_TIMEOUT:-200}" "$PY" pretrain/pretrain_resformer.py --config resformer_82m ${spec#* } $SHAPE $BATCH \
    train.train_steps=$STEPS train.eval_interval=0 train.eval_steps=2 optim.lr_warmup_steps=$WARMUP \
    "data.paths=[$D/corpus]" data.tokenizer_model=$D/tok.model data.split=98,2,0 data.cache_dir=$D/cache \
    checkpoint.dir=null logging.dir=$WORK/runs/$name logging.wandb_project=null ${RF_CHECK_OVERRIDES:-} >"$WORK/runs/$name.log" 2>&1 ||
    { echo "run $name failed (exit $?):"; grep -v "^\s*$" "$WORK/runs/$name.log" | tail -15; }
  grep -E "^step .*/" "$WORK/runs/$name.log" | tail -1
done
fi

if part overhead; then
say "bench/value_residual_overhead.py: the three models side by side, alternating timed steps"
if [ "$DRY" = 1 ]; then BENCH="--layers 2 --hidden 64 --heads 2 --seq 128 --rounds 2"
else BENCH="--layers 8 --hidden 512 --heads 8 --seq 2048 --micro-batch 8 --microbatches 4 --dtype bf16 --vocab 50304 --rounds 10 --warmup 3"; fi
RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29500 + RANDOM % 1000)) \
  timeout 300 "$PY" -W ignore bench/value_residual_overhead.py $BENCH > "$WORK/bench.log" 2>&1 || echo "bench failed (exit $?)"
grep -E "^#|x$|bytes" "$WORK/bench.log"
fi

fi

if [ "$QUALITY" != 0 ]; then
  say "bench/quality.py --size resformer_82m: vanilla / ResFormer identity / SVFormer on real English, held-out set scored whole"
  if [ -f "$QDATA/train.idx" ] && [ -f "$QDATA/valid.idx" ] && [ -f "$QDATA/tok.model" ]; then
    QIN="--data $QDATA/train --valid $QDATA/valid --tokenizer $QDATA/tok.model"
    [ -f "$QDATA/valid.jsonl" ] && QIN="$QIN --text-jsonl $QDATA/valid.jsonl"
  elif [ "$DRY" = 1 ]; then  # the plumbing on the synthetic corpus when the English one is not built here
    echo "no English corpus in $QDATA: the synthetic one instead (dry run)"
    D=$WORK/data
    [ -f "$D/corpus.idx" ] || { "$PY" tests/gpu/device_check.py corpus "$D" --documents "$DOCS" &&
      "$PY" tools/train_tokenizer.py --input "$D/corpus.jsonl" --vocab-size 4000 --max-sentences 3000 --output-prefix "$D/tok" >"$WORK/data.log" 2>&1 &&
      "$PY" tools/preprocess_data.py --input "$D/corpus.jsonl" --tokenizer-model "$D/tok.model" --output-prefix "$D/corpus" >>"$WORK/data.log" 2>&1; }
    QIN="--data $D/corpus --tokenizer $D/tok.model"
  else
    QIN=""
    echo "error: no English corpus in $QDATA (train.idx, valid.idx, tok.model): build it with python tools/build_english_corpus.py and carry data/english (tests/gpu/README.md)"
    QUALITY_RC=2
  fi
  if [ -n "$QIN" ]; then
    if [ "$DRY" = 1 ]; then QSIZE="--steps 2 --evals 1 --set ${SHAPE/ model.vocab_size=4096/} train.global_batch_size=4 train.micro_batch_size=2 train.log_interval=1"
    else QSIZE="--minutes ${RF_CHECK_QUALITY_MINUTES:-2}"; fi
    timeout "${RF_CHECK_QUALITY_TIMEOUT:-900}" "$PY" -W ignore bench/quality.py --size resformer_82m \
      --variants vanilla identity svformer --seeds "${RF_CHECK_QUALITY_SEEDS:-1}" $QIN --out "$WORK/quality" \
      ${RF_CHECK_QUALITY_ARGS:-} $QSIZE > "$WORK/quality.log" 2>&1
    QUALITY_RC=$?
    [ "$QUALITY_RC" = 0 ] || { echo "quality bench failed (exit $QUALITY_RC):"; grep -v "^\s*$" "$WORK/quality.log" | tail -25; }
  fi
fi

if [ -n "${RF_CHECK_OUT:-}" ]; then
  OUTDIR=$(mkdir -p "$RF_CHECK_OUT" && cd "$RF_CHECK_OUT" && pwd) &&
    (cd "$WORK" && tar czf "$OUTDIR/device_check_logs.tgz" --ignore-failed-read throughput.log pytest.log data.log \
      bench.log quality.log runs quality/report.md quality/results.json quality/valid_curves.png quality/lambdas.png \
      quality/runs/*/metrics.jsonl 2>/dev/null)
fi
say "summary${SHAPE:+ (DRY RUN on the simulated GPU: plumbing only, no GPU figures)}"
if [ "$QUALITY" != only ]; then
  part pytest && grep -E "passed|failed" "$WORK/pytest.log" | tail -1 | sed 's/^/pytest tests\/gpu: /'
  if part train; then
    "$PY" tests/gpu/device_check.py table "$WORK/runs" "${NAMES[@]}"
    TABLE_RC=$?
  fi
fi
if [ "$QUALITY" != 0 ] && [ -f "$WORK/quality/report.md" ]; then
  grep -E "^resformer_82m:|^at [0-9,]+ tokens/s|^  [a-z]+ seed [0-9]+:" "$WORK/quality.log"
  cat "$WORK/quality/report.md"
  grep -E "^wrote " "$WORK/quality.log"
fi
[ "$PYTEST_RC" = 0 ] && [ "$TABLE_RC" = 0 ] && [ "$QUALITY_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
