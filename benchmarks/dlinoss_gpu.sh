#!/usr/bin/env bash
# The GPU evidence for `dlinoss` (issue 16), for one device-tool call on an H100/H200.
# Assumes `python3 -m pip install -q --no-deps --no-build-isolation -e .` already ran; installs
# nothing. Writes under "$OUT": the GPU tests, the linoss_scan benchmark (kernel vs seed step
# loop vs compiled associative_scan vs copy bandwidth), and `seqdeploy run dlinoss` (base).
# Budget: at most 150 + 125 + 280 s; each stage is cut by its timeout rather than overrun (the
# benchmark prints and saves each size as it finishes).
set -uo pipefail
O=${OUT:-/tmp/seqdeploy-out}
mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$O/dlinoss_gpu.txt"
# the tests JIT-compile each design per dtype and shape (the step-loop kernel about 9 s a
# compile): they run in 12 pytest-xdist workers where xdist is installed (the device machine
# has it; on an H100 they took 61 s so)
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
timeout 150 python3 -m pytest -q -p no:cacheprovider -rf --tb=line $XDIST tests/test_dlinoss_scan.py -m "not slow" \
    -k "cuda or triton or near_unit" 2>&1 | tail -15 | tee "$O/dlinoss_pytest_gpu.txt"
timeout 125 python3 benchmarks/dlinoss_scan.py --budget-s 110 --json "$O/dlinoss_scan.json" 2>&1 | grep -v Warning \
    | tee "$O/dlinoss_scan.txt"
timeout 280 seqdeploy run dlinoss --out /tmp/seqdeploy-dl --no-plot 2>&1 | grep -v "^  \[" \
    | tail -40 | tee "$O/dlinoss_run.txt"
cp /tmp/seqdeploy-dl/dlinoss/base/parity.json "$O/dlinoss_parity.json" 2>/dev/null
cp /tmp/seqdeploy-dl/dlinoss/base/bench.json "$O/dlinoss_bench.json" 2>/dev/null
# optional, in a second call: the tiling sweep at every size (about 2.5 minutes)
if [ "${DLINOSS_SWEEP:-0}" = "1" ]; then
    timeout 160 python3 benchmarks/dlinoss_scan.py --sweep --no-seed-loop --budget-s 150 \
        --json "$O/dlinoss_sweep.json" 2>&1 | grep -v Warning | tee "$O/dlinoss_sweep.txt"
fi
exit 0
