#!/usr/bin/env bash
# Evaluation of the four 64² Kolmogorov worlds (made by gpu_kolmogorov64.sh) on one GPU,
# about 3 minutes on an H100; every stage also runs on a CPU (DEVICE=cpu), only slower.
#   1. the two CUDA test cases fixed after the first GPU run;
#   2. BENCHMARKS.md D forecasts on a validation truth (seed 8) for a grid of model-error
#      levels q (conditional, function space) and DYffusion kernel-variance scales c;
#   3. the test truth (seed 7) with, per kind, the setting whose validation spread/skill
#      was closest to 1 (--choose-from), function space also at 32² and 128²;
#   4. the fluid DA case at 64² (bench_dpf_kolmogorov.py), one seed per setting.
# Knobs: DEVICE (cuda), CKPT_DIR (~/.cache/assim/worlds64), DEST (experiments/results/gpu64).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
CKPT_DIR=${CKPT_DIR:-$HOME/.cache/assim/worlds64}
DEST=${DEST:-experiments/results/gpu64}
R=experiments/results
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg PYTHONUNBUFFERED=1
LOG="$DEST/gpu_eval64.log"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
: >"$LOG"

log "1. fixed CUDA tests"
timeout 60 $PY -m pytest -q -p no:cacheprovider -m cuda tests/models/test_denoiser.py \
  tests/assim/test_impute_calibration.py 2>&1 | tail -n 4 | tee -a "$LOG"

FC="experiments/bench_forecast_worlds.py --system kolmogorov --n 64 --device $DEVICE"
FC="$FC --ckpt-dir $CKPT_DIR --traj 2 --ics 2 --members 16 --turnovers 5"
log "2. validation truth (seed 8)"
timeout 70 $PY $FC --seed 8 --tag _val_seed8 --fs-grids 64 \
  --q conditional=0,0.25,0.5,1 function_space=0,0.5,1,2 --var-scale 0.25,0.5,1 2>&1 |
  grep -v "^|" | tee -a "$LOG"
cp $R/bench_forecast_worlds_kolmogorov64_val_seed8.json "$DEST/" 2>/dev/null

log "3. test truth (seed 7), settings chosen on seed 8"
timeout 70 $PY $FC --choose-from $R/bench_forecast_worlds_kolmogorov64_val_seed8.json \
  --fs-grids 32 128 2>&1 | tail -n 12 | tee -a "$LOG"
cp $R/bench_forecast_worlds_kolmogorov64.{json,md,png} "$DEST/" 2>/dev/null

log "4. fluid DA at 64², one seed per setting"
for s in a b; do
  timeout 45 $PY experiments/bench_dpf_kolmogorov.py --n 64 --device "$DEVICE" --seeds 0 \
    --ckpt "$CKPT_DIR/kolmogorov64_conditional.pt" --op-a coarsen:8 --settings $s \
    --tag _64 >"/tmp/dpf64_$s.log" 2>&1 &
done
wait
cat /tmp/dpf64_a.log /tmp/dpf64_b.log | grep -v Warn | tail -n 12 | tee -a "$LOG"
cp $R/bench_dpf_kolmogorov_64_a.json $R/bench_dpf_kolmogorov_64_b.json "$DEST/" 2>/dev/null
log "done"
