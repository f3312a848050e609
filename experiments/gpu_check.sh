#!/usr/bin/env bash
# GPU check (< 5 minutes): the CUDA-parametrised tests, a simulator throughput
# benchmark (cpu vs cuda, side by side in one run) and the quick benchmarks that exist.
# Usage: bash experiments/gpu_check.sh        (from anywhere; uses .venv if present)
# Results: experiments/results/gpu_check.txt (or $GPU_CHECK_OUT). GPU_CHECK_TESTS limits
# pytest to some test paths (default: the whole suite's cuda cases).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
OUT=${GPU_CHECK_OUT:-experiments/results/gpu_check.txt}
mkdir -p "$(dirname "$OUT")"
status=0

log() { echo "$@" | tee -a "$OUT"; }
: > "$OUT"
log "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "no CUDA device visible to torch: nothing to check"; exit 1
fi

log "## pytest -m cuda (tests parametrised over devices, cuda cases)"
timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider ${GPU_CHECK_TESTS:-} 2>&1 | tail -n 25 | tee -a "$OUT"
rc=${PIPESTATUS[0]}
log "pytest exit code: $rc"
[ "$rc" -eq 0 ] || status=1

log "## simulator throughput (states per second, one world step each)"
timeout 60 "$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT"
import time

import torch

from models.physics import Kolmogorov, Lorenz96

torch.set_num_threads(1)


def rate(sim, n, dev, dtype, steps):
    x = sim.random_state(n, torch.Generator().manual_seed(0), dtype=dtype, device=dev)
    for _ in range(3):
        x = sim.step(x, sim.default_dt)
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        x = sim.step(x, sim.default_dt)
    if dev == "cuda":
        torch.cuda.synchronize()
    assert torch.isfinite(x).all()
    return n * steps / (time.perf_counter() - t0)


print(f"{'simulator':<22}{'N':>6}{'dtype':>9}{'cpu (1 thread)':>16}{'cuda':>14}{'speed-up':>10}")
for name, sim, n, steps in [
    ("lorenz96 n=40", Lorenz96(), 4096, 200),
    ("kolmogorov 64^2", Kolmogorov(), 64, 20),
]:
    for dtype in (torch.float32, torch.float64):
        c = rate(sim, n, "cpu", dtype, steps)
        g = rate(sim, n, "cuda", dtype, steps * 5)
        print(f"{name:<22}{n:>6}{str(dtype)[6:]:>9}{c:>16.0f}{g:>14.0f}{g / c:>9.1f}x")
PYEOF
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "## quick benchmarks (each capped at 35 s)"
for b in bench_forecast bench_impute bench_anomaly; do
  f="experiments/$b.py"
  if [ -f "$f" ] && grep -q -- "--quick" "$f"; then
    timeout 35 "$PY" "$f" --quick 2>&1 | tail -n 15 | tee -a "$OUT"
    log "$b --quick exit code: ${PIPESTATUS[0]}"
  fi
done
log "results in $OUT"
exit "$status"
