#!/usr/bin/env bash
# Kolmogorov flow at 64² on one GPU (about 8 minutes on an H100): issues #8 and #7.
#   1. the CUDA-parametrised test cases (in the background, while the GPU trains);
#   2. the four world kinds trained at 64² in parallel (experiments/train_kolmogorov.py with
#      experiments/kolmogorov_<kind>.toml, the CPU recipe; only the wall-clock cap differs);
#   3. BENCHMARKS.md D forecasts at 64² (bench_forecast_worlds.py --system kolmogorov --n 64; the
#      function-space world also at 32² and 128²) and, in parallel,
#   4. the fluid data-assimilation case at 64² (bench_dpf_kolmogorov.py --n 64, settings a
#      and b: coarsened x8 every 4th step; every 4th point) with the 64² conditional world.
# Everything also runs on a CPU (DEVICE=cpu), only slower.
# Usage: bash experiments/gpu_kolmogorov64.sh
# Knobs (environment): DEVICE (cuda), N (64), TRAJ (64), SNAPS (200), MINUTES (3.5, per
# world), CKPT_DIR (~/.cache/assim/worlds64), DEST (experiments/results/gpu64: logs, results
# tarball and checkpoints), FAST=1 (tiny sizes: a smoke test of this script), TESTS=0 skips 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
N=${N:-64}
TRAJ=${TRAJ:-64}
SNAPS=${SNAPS:-200}
MINUTES=${MINUTES:-3.0}
CKPT_DIR=${CKPT_DIR:-$HOME/.cache/assim/worlds64}
DEST=${DEST:-experiments/results/gpu64}
KINDS="conditional dyffusion rolling function_space"
FC_ARGS="--traj 2 --ics 2 --members 16 --turnovers 5"
DPF_ARGS="--seeds 0 1 2 --cycles-a 12 --cycles-b 30"
if [ "${FAST:-0}" = 1 ]; then
  TRAJ=2 SNAPS=80 MINUTES=0.05
  FC_ARGS="--quick"
  DPF_ARGS="--seeds 0 --cycles-a 2 --cycles-b 2 --n-dpf 4 --n-letkf 4 --steps 2"
fi
mkdir -p "$DEST" "$CKPT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg PYTHONUNBUFFERED=1
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$DEST/gpu_kolmogorov64.log"; }
: >"$DEST/gpu_kolmogorov64.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader |
  tee -a "$DEST/gpu_kolmogorov64.log"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" |
  tee -a "$DEST/gpu_kolmogorov64.log"

if [ "${TESTS:-1}" = 1 ]; then
  log "1. pytest -m cuda (background)"
  (timeout 330 $PY -m pytest -q -m cuda -p no:cacheprovider tests >"$DEST/pytest_cuda.log" 2>&1
   echo "pytest exit code: $?" >>"$DEST/pytest_cuda.log") &
  TEST_PID=$!
fi

log "2. training the four worlds at ${N}² (${MINUTES} min each, in parallel)"
pids=()
for kind in $KINDS; do
  $PY experiments/train_kolmogorov.py --n "$N" --traj "$TRAJ" --snaps "$SNAPS" \
    --minutes "$MINUTES" --device "$DEVICE" --config "experiments/kolmogorov_$kind.toml" \
    --out "$CKPT_DIR/kolmogorov${N}_$kind.pt" >"$DEST/train_$kind.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || log "a training exited with $?"; done
log "trained: $(ls "$CKPT_DIR" | tr '\n' ' ')"

log "3+4. forecast benchmark and fluid DA benchmark at ${N}² (in parallel)"
timeout 200 $PY experiments/bench_forecast_worlds.py --system kolmogorov --n "$N" --device "$DEVICE" \
  --ckpt-dir "$CKPT_DIR" --fs-grids $((N / 2)) $((N * 2)) $FC_ARGS \
  >"$DEST/bench_forecast_kolmogorov$N.log" 2>&1 &
f_pid=$!
for s in a b; do
  timeout 200 $PY experiments/bench_dpf_kolmogorov.py --n "$N" --device "$DEVICE" \
    --ckpt "$CKPT_DIR/kolmogorov${N}_conditional.pt" --op-a coarsen:8 --settings $s \
    --tag "_$N" $DPF_ARGS >"$DEST/bench_dpf_kolmogorov${N}_$s.log" 2>&1 &
  pids+=($!)
done
wait $f_pid || log "forecast benchmark exited with $?"
wait || true
[ -n "${TEST_PID:-}" ] && { wait "$TEST_PID" 2>/dev/null; tail -n 3 "$DEST/pytest_cuda.log" | tee -a "$DEST/gpu_kolmogorov64.log"; }

log "collecting"
tar -czf "$DEST/results.tar.gz" -C experiments/results \
  $(cd experiments/results && ls -d bench_forecast_worlds_kolmogorov"$N"* bench_dpf_kolmogorov_"$N"* \
    train_kolmogorov"$N"_* 2>/dev/null) 2>>"$DEST/gpu_kolmogorov64.log"
for kind in $KINDS; do
  [ -f "$CKPT_DIR/kolmogorov${N}_$kind.pt" ] && cp "$CKPT_DIR/kolmogorov${N}_$kind.pt" "$DEST/"
done
tar -czf "$DEST/logs.tar.gz" -C "$DEST" $(cd "$DEST" && ls *.log)
log "done"
