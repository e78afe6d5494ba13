#!/usr/bin/env bash
# The seed recipe on one accelerator, in one command: simulate the seed-size Model II set on
# every core, benchmark the steps and the real training loop (ours, and PyTorch eager when
# torch is there), profile a few pretraining steps, then run the whole pipeline
# (pretrain 100 + 250 epochs, probe, fine-tune) and write the report, a JSON of every figure
# and a summary table into OUT.
#
#   benchmarks/accelerator_run.sh [PRESET] [OUT]       # PRESET: seed_gpu (default) or tiny
#
# Made for a bare GPU machine that has JAX, flax, optax and orbax but no TensorFlow, tfds or
# clu and no network: the device feed and the safe reader need none of them. The few other
# packages travel as wheels in .whl/ (Python 3.12, manylinux x86-64), made here once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl ml-collections==1.1.0 lenstronomy==1.14.2 astropy==8.0.2 \
#     astropy-iers-data==0.2026.11.23.0.51.45 pyerfa==2.0.1.5
# (matplotlib, scikit-learn, tensorboard, tqdm, absl-py and PyYAML are on that machine).
#
# seed_gpu is the seed recipe with larger batches (pretrain 1024, probe 1024, fine-tune 512)
# and every learning rate scaled linearly with the batch; the report says so. Budget: about
# 9 minutes on one H200 in bfloat16. `tiny` runs the same steps at test sizes on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-seed_gpu}
OUT=${2:-${OUT:-runs/accelerator}}
mkdir -p "$OUT"
RUN=${RUN_DIR:-runs/accelerator_$PRESET}
LOG="$OUT/accelerator_run.log"
: > "$LOG"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
START=$(date +%s)
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mae_jax_site .whl/*.whl
  export PYTHONPATH=/tmp/mae_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export MAE_JAX_COMPILATION_CACHE=${MAE_JAX_COMPILATION_CACHE:-/tmp/mae_jax_xla}

case "$PRESET" in
  seed_gpu) PER_CLASS=30000; DTYPE=bfloat16; BENCH="--preset seed --batch 1024 --steps 10 --repeats 5 --loop --loop_batches 256,1024 --loop_steps 40 --loop_epochs 3"; PROFILE="(300, 320)";;
  tiny)     PER_CLASS=24;    DTYPE=float32;  BENCH="--preset tiny --batch 8 --steps 2 --repeats 2 --loop --loop_batches 8 --loop_steps 3 --loop_epochs 2"; PROFILE="(1, 2)";;
  *) echo "error: PRESET must be seed_gpu or tiny, got $PRESET" >&2; exit 2;;
esac
if [ "$PRESET" = tiny ]; then DATA=${DATA:-data/model_ii_sim_tiny}; else DATA=${DATA:-data/model_ii_sim}; fi

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, jax
print("jax", jax.__version__, "devices:", jax.devices())
for name in ("tensorflow", "tensorflow_datasets", "clu", "ml_collections", "lenstronomy", "torch"):
  print(f"  {name}: {'present' if importlib.util.find_spec(name) else 'absent'}")
EOF

say "1/4 simulating $PER_CLASS images per class into $DATA on $(nproc) cores"
"$PY" -m mae_jax.data.simulate --out "$DATA" --per_class "$PER_CLASS" --workers "$(nproc)" \
  2>&1 | tail -n 3 | tee -a "$LOG"

say "2/4 benchmark: steps, real loop (device and host feeds)"
SYSTEMS=ours
"$PY" -c "import torch" 2>/dev/null && SYSTEMS=ours,torch
# shellcheck disable=SC2086
"$PY" benchmarks/throughput.py $BENCH --dtype "$DTYPE" --systems "$SYSTEMS" --no_pipeline \
  2>>"$LOG" | tee "$OUT/throughput.txt"

say "3/4 pipeline ($PRESET, $DTYPE, device feed): data, pretrain, probe, fine-tune, report"
"$PY" main.py --config="configs/pipeline.py:$PRESET" --workdir="$RUN" \
  --config.data.dir="$DATA" --config.data.feed=device ${DATA_CACHE:+--config.data.cache_dir="$DATA_CACHE"} \
  --config.pretrain.model.dtype="$DTYPE" --config.probe.model.dtype="$DTYPE" \
  --config.finetune.model.dtype="$DTYPE" \
  --config.pretrain.profile_steps="$PROFILE" 2>>"$LOG" | tail -n 5

say "4/4 profile of pretraining steps $PROFILE and the summary"
"$PY" benchmarks/profile_summary.py "$RUN/pretrain/profile" --top 15 \
  --json "$OUT/profile.json" | tee "$OUT/profile.txt"
cp "$RUN/report.md" "$RUN/report.json" "$RUN/figures.json" "$OUT/"
"$PY" benchmarks/accelerator_summary.py "$RUN" "$OUT/throughput.txt" \
  --seconds $(( $(date +%s) - START )) | tee "$OUT/summary.md"
say "done in $(( $(date +%s) - START )) s; files in $OUT"
