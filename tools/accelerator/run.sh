#!/usr/bin/env bash
# The seed recipe on one accelerator, in one command per part (docs/accelerator.md):
#
#   tools/accelerator/run.sh [PRESET] [OUT] [PART]
#     PRESET: seed_gpu (the default) or tiny (test sizes, float32, for a CPU rehearsal)
#     PART:   bench  (A) the real-loop throughput only: pretraining at batch 1024 and
#                    fine-tuning at 512, device feed, bfloat16, the attention
#                    implementation printed; PyTorch eager after it when torch sees a GPU.
#                    No data, no simulation. Made to end within 4 minutes on one H200.
#             short  (B) every stage of the seed_gpu pipeline, shortened: a smaller
#                    simulated set, a few epochs per stage, a profile of one pretraining
#                    epoch; per-epoch rates, the profile summary and the report in OUT.
#                    Resumable: a rerun reuses the data and completed stages. Made to end
#                    within 7 minutes on one H200.
#             all    (the default) the whole seed_gpu run: simulation, benchmark, the full
#                    pipeline (pretrain 100 + 250 epochs, probe, fine-tune), profile, summary.
#
# Made for a bare GPU machine that has JAX, flax, optax and orbax but no TensorFlow, tfds,
# clu or network, and maybe no `python -m pip`: the device feed and the safe reader need
# none of them. What is missing there travels as wheels in .whl/, built here with
# `python tools/accelerator/wheels.py build` and installed there by unzipping them
# (`tools/accelerator/wheels.py install`, no pip). Torch is optional everywhere: a PyTorch worker
# that fails, times out or finds no GPU is reported and skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
PRESET=${1:-seed_gpu}
OUT=${2:-${OUT:-runs/accelerator}}
PART=${3:-${PART:-all}}
case "$PART" in all|bench|short) ;; *) echo "error: PART must be all, bench or short, got $PART" >&2; exit 2;; esac
mkdir -p "$OUT"
if [ "$PART" = all ]; then RUN=${RUN_DIR:-runs/accelerator_$PRESET}; else RUN=${RUN_DIR:-runs/accelerator_${PRESET}_$PART}; fi
LOG="$OUT/accelerator_run.log"
: > "$LOG"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
START=$(date +%s)
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${WHEEL_SITE:-/tmp/mae_jax_site}
  "$PY" tools/accelerator/wheels.py install --dest .whl --target "$SITE" 2>&1 | tee -a "$LOG"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
# XLA's and cuDNN's warnings (not their info lines) reach the log.
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export MAE_JAX_COMPILATION_CACHE=${MAE_JAX_COMPILATION_CACHE:-/tmp/mae_jax_xla}

case "$PRESET" in
  seed_gpu) PER_CLASS=30000; SHORT_PER_CLASS=${SHORT_PER_CLASS:-6000}; DTYPE=bfloat16; SIZE=seed
            BATCHES="pretrain:1024 finetune:512"; LOOP="--loop_steps 30 --loop_epochs 3"
            STEPS="--steps 10 --repeats 5"; PROFILE="(300, 320)"; SHORT_PROFILE="(12, 13)"
            SHORT="--config.pretrain.phase_epochs=(2,2) --config.probe.epochs=3 --config.finetune.epochs=3";;
  tiny)     PER_CLASS=24; SHORT_PER_CLASS=${SHORT_PER_CLASS:-24}; DTYPE=float32; SIZE=tiny
            BATCHES="pretrain:8 finetune:8"; LOOP="--loop_steps 3 --loop_epochs 2"
            STEPS="--steps 2 --repeats 2"; PROFILE="(1, 2)"; SHORT_PROFILE="(1, 2)"
            SHORT="--config.pretrain.phase_epochs=(1,1) --config.probe.epochs=1 --config.finetune.epochs=1";;
  *) echo "error: PRESET must be seed_gpu or tiny, got $PRESET" >&2; exit 2;;
esac
[ "$PART" = short ] && PER_CLASS=$SHORT_PER_CLASS
if [ "$PRESET" = tiny ]; then DATA=${DATA:-data/model_ii_sim_tiny}; else DATA=${DATA:-data/model_ii_sim}; fi
[ "$PART" = short ] && [ "$PRESET" != tiny ] && DATA=${DATA_SHORT:-${DATA}_short}

# The environment; seed_gpu stops here, at once, where JAX sees no accelerator (a CPU
# fallback would spend the whole device time on a batch-1024 loop).
PRESET=$PRESET "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, os, sys, jax
from mae_jax.models import attention
print("python", sys.version.split()[0], "jax", jax.__version__, "devices:", jax.devices())
print("attention implementation asked:", attention.implementation())
for name in ("tensorflow", "tensorflow_datasets", "clu", "ml_collections", "lenstronomy", "torch"):
  print(f"  {name}: {'present' if importlib.util.find_spec(name) else 'absent'}")
if os.environ["PRESET"] == "seed_gpu" and jax.default_backend() == "cpu":
  sys.exit("error: seed_gpu needs an accelerator, but JAX sees only the CPU (is jax[cuda] installed?)")
EOF

TORCH=0
torch_check() {   # torch_check SECONDS: TORCH=1 when torch imports (and, but for tiny, sees a GPU)
  local test="import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
  [ "$PRESET" = tiny ] && test="import torch"
  timeout -k 5 "$1" "$PY" -c "$test" 2>/dev/null && TORCH=1
  say "torch: $([ $TORCH = 1 ] && echo "usable, PyTorch eager is timed after ours" || echo "not used (absent, no GPU for it, or no time)")"
}

# The benchmark: per task at its pipeline batch, ours first; torch after, never blocking.
bench() {   # bench SYSTEMS EXTRA...
  local systems=$1; shift
  for tb in $BATCHES; do
    local task=${tb%%:*} batch=${tb##*:}
    # shellcheck disable=SC2086
    "$PY" benchmarks/throughput.py --preset "$SIZE" --task "$task" --batch "$batch" --dtype "$DTYPE" \
      --systems "$systems" --loop_batches "$batch" --no_pipeline --compilation_cache "$MAE_JAX_COMPILATION_CACHE" \
      --torch_timeout "${TORCH_TIMEOUT:-90}" "$@" 2>>"$LOG" | tee -a "$OUT/throughput.txt"
  done
}

simulate() {
  say "simulating $PER_CLASS images per class into $DATA on $(nproc) cores"
  "$PY" -m mae_jax.data.simulate --out "$DATA" --per_class "$PER_CLASS" --workers "$(nproc)" \
    2>>"$LOG" | tail -n 3 | tee -a "$LOG"
}

pipeline() {   # pipeline PROFILE EXTRA...
  local profile=$1; shift
  # shellcheck disable=SC2068
  "$PY" main.py --config="configs/pipeline.py:$PRESET" --workdir="$RUN" \
    --config.data.dir="$DATA" --config.data.sim.per_class="$PER_CLASS" --config.data.feed=device \
    ${DATA_CACHE:+--config.data.cache_dir="$DATA_CACHE"} \
    --config.pretrain.model.dtype="$DTYPE" --config.probe.model.dtype="$DTYPE" \
    --config.finetune.model.dtype="$DTYPE" --config.finetune.fit_baseline=False \
    --config.pretrain.profile_steps="$profile" "$@" 2>>"$LOG" | tail -n 5 | tee -a "$LOG"
}

finish() {   # finish PROFILE: the profile summary, the report's files and summary.md
  say "profile of pretraining steps $1 (snapped to the loop's chunks) and the summary"
  "$PY" benchmarks/profile_summary.py "$RUN/pretrain/profile" --top 15 \
    --json "$OUT/profile.json" > "$OUT/profile.txt" 2>>"$LOG" || say "no profile summary"
  # The device tool brings back at most 8 files: (B) writes 7, (A) 3.
  for f in report.md report.json ${COPY_FIGURES:+figures.json}; do
    if [ -f "$RUN/$f" ]; then cp "$RUN/$f" "$OUT/"; fi
  done
  "$PY" tools/accelerator/summary.py --epochs "$RUN" > "$OUT/epochs.md"
  "$PY" tools/accelerator/summary.py "$RUN" "$OUT/throughput.txt" \
    --seconds $(( $(date +%s) - START )) > "$OUT/summary.md"
  cat "$OUT/summary.md"
}

bench_summary() {   # (A): summary.md from the benchmark's printout so far (replaced whole)
  "$PY" tools/accelerator/summary.py "$RUN" "$OUT/throughput.txt" \
    --seconds $(( $(date +%s) - START )) > "$OUT/summary.md.tmp"
  mv "$OUT/summary.md.tmp" "$OUT/summary.md"
  cat "$OUT/summary.md"
}

[ "$PART" = short ] || : > "$OUT/throughput.txt"
case "$PART" in
  bench)
    say "(A) real loop: $BATCHES, device feed, $DTYPE"
    # shellcheck disable=SC2086
    bench "" --loop --loop_feeds device $LOOP
    bench_summary   # before torch: a time-out there loses nothing of ours
    # PyTorch eager only in the time (A) has left of BENCH_BUDGET: a check, then two workers.
    left=$(( ${BENCH_BUDGET:-225} - ($(date +%s) - START) ))
    if [ "$left" -ge 60 ]; then torch_check $(( left / 4 )); else say "torch: not tried, $left s left"; fi
    if [ $TORCH = 1 ]; then
      # less 10 s for the two benchmark drivers' start and the summary
      left=$(( ${BENCH_BUDGET:-225} - ($(date +%s) - START) - 10 ))
      limit=${TORCH_TIMEOUT:-90}; [ $(( left / 2 )) -lt "$limit" ] && limit=$(( left / 2 ))
      say "(A) PyTorch eager at the same batches (optional, $limit s per task at most)"
      # shellcheck disable=SC2086
      TORCH_TIMEOUT=$limit bench torch $STEPS || say "PyTorch eager failed; ours above stand"
      bench_summary
    fi
    ;;
  short)
    say "(B) 1/3 data ($PER_CLASS per class)"; simulate
    say "(B) 2/3 pipeline ($PRESET shortened, $DTYPE, device feed): data, pretrain, probe, fine-tune, report"
    # shellcheck disable=SC2086
    pipeline "$SHORT_PROFILE" --config.pretrain.checkpoint_every_epochs=1 \
      --config.pretrain.optim.warmup_epochs=0.5 --config.probe.optim.warmup_epochs=0.5 \
      --config.finetune.optim.warmup_epochs=0.5 $SHORT
    say "(B) 3/3 summary"; finish "$SHORT_PROFILE"
    ;;
  all)
    torch_check 60
    say "1/4 data"; simulate
    say "2/4 benchmark: steps, real loop (device and host feeds) at $BATCHES"
    SYSTEMS=ours; [ $TORCH = 1 ] && SYSTEMS=ours,torch
    # shellcheck disable=SC2086
    bench "$SYSTEMS" $STEPS --loop $LOOP
    say "3/4 pipeline ($PRESET, $DTYPE, device feed): data, pretrain, probe, fine-tune, report"
    pipeline "$PROFILE"
    say "4/4 summary"; COPY_FIGURES=1 finish "$PROFILE"
    ;;
esac
say "done in $(( $(date +%s) - START )) s; files in $OUT"
