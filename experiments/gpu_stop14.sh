#!/usr/bin/env bash
# Kolmogorov 64² evaluations on one GPU (about 7 minutes on an H100), issues #8, #9 and #7:
#   1. BENCHMARKS.md D forecasts of the four 64² worlds with 4 trajectories x 3 ICs x 16
#      members (three times the ICs of gpu_eval64.sh, so spread/skill per lead is less
#      noisy): a validation truth (seed 8) over a grid of q / DYffusion variance scales, the
#      function-space world also at 32² and 128² (its q chosen per grid), then the test
#      truth (seed 7) with the settings chosen on seed 8 (--choose-from);
#   2. BENCHMARKS.md E imputation on Kolmogorov 64² (bench_impute.py --datasets kolmogorov64)
#      with the ensemble Kalman smoother through the shipped 64² world on the GPU, against
#      climatology, linear interpolation and Matérn OI (seeds 0 and 1 in parallel);
#   3. the fluid DA case at 64² with --device cuda (bench_dpf_kolmogorov.py, seed 0): the
#      check of the runner fix (truth on the GPU) that gpu_eval64.sh found.
# Every stage also runs on a CPU (DEVICE=cpu), only much slower.
# Knobs: DEVICE (cuda), CKPT_DIR (~/.cache/assim/worlds64), DEST (experiments/results/gpu14),
# THREADS (CPU threads per imputation process, 6).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
CKPT_DIR=${CKPT_DIR:-$HOME/.cache/assim/worlds64}
DEST=${DEST:-experiments/results/gpu14}
THREADS=${THREADS:-6}
R=experiments/results
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg PYTHONUNBUFFERED=1
LOG="$DEST/gpu_stop14.log"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
: >"$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$LOG"

log "2. imputation at 64² (seeds 0, 1 in parallel, background)"
IMP="experiments/bench_impute.py --datasets kolmogorov64 --seeds 1 --no-twisted --no-spatial"
IMP="$IMP --ablations --no-prior --device $DEVICE --threads $THREADS"
for s in 0 1; do
  timeout 400 $PY $IMP --first-seed $s --tag kolmogorov64_world_s$s >"$DEST/impute_s$s.log" 2>&1 &
done

log "3. fluid DA at 64² on $DEVICE, seed 0 (background)"
for s in a b; do
  timeout 300 $PY experiments/bench_dpf_kolmogorov.py --n 64 --device "$DEVICE" --seeds 0 \
    --ckpt "$CKPT_DIR/kolmogorov64_conditional.pt" --op-a coarsen:8 --settings $s \
    --tag _64gpu >"$DEST/dpf64_$s.log" 2>&1 &
done

FC="experiments/bench_forecast_worlds.py --system kolmogorov --n 64 --device $DEVICE"
FC="$FC --ckpt-dir $CKPT_DIR --traj 4 --ics 3 --members 16 --turnovers 5"
log "1a. forecasts, validation truth (seed 8)"
timeout 260 $PY $FC --seed 8 --tag _val_seed8_12ic --fs-grids 32 128 \
  --q conditional=0.5,0.75,1,1.5 function_space=0.25,0.5,1 --var-scale 0.5,0.75,1 2>&1 |
  grep -v "^|" | tee -a "$LOG"
log "1b. forecasts, test truth (seed 7), settings chosen on seed 8"
timeout 120 $PY $FC --choose-from $R/bench_forecast_worlds_kolmogorov64_val_seed8_12ic.json \
  --fs-grids 32 128 --tag _12ic 2>&1 | tail -n 12 | tee -a "$LOG"
log "waiting for the background stages"
wait
tail -n 14 "$DEST"/impute_s*.log | tee -a "$LOG"
grep -v Warn "$DEST"/dpf64_*.log | tail -n 16 | tee -a "$LOG"
tar czf "$DEST/results.tgz" $R/bench_forecast_worlds_kolmogorov64_*12ic* \
  $R/bench_impute_kolmogorov64_world_s* $R/impute_kolmogorov64.png \
  $R/bench_dpf_kolmogorov_64gpu* "$DEST"/*.log 2>/dev/null
log "done"
