#!/usr/bin/env bash
# The GPU evidence of every architecture and engine, in stages that fit device-tool calls.
#   STAGES="ort dlinoss ten" bash benchmarks/gpu_evidence.sh   (default: every stage)
# Each stage runs its own script (benchmarks/<stage>_gpu.sh) under a time budget in seconds
# (BUDGET_<stage>), writes under $OUT, and prints its summary. Assumes the editable install
# (python3 -m pip install -q --no-deps --no-build-isolation -e .); installs nothing from the
# network: onnxruntime-gpu in /tmp/site and TensorRT-RTX parts are carried (DEVICE.md,
# benchmarks/trt_rtx_parts.sh); SEQDEPLOY_ORT_LIBRARY names the prebuilt ORT op library.
set -uo pipefail
export OUT=${OUT:-/tmp/seqdeploy-out}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
budget() { local v="BUDGET_$1"; echo "${!v:-$2}"; }
# the prebuilt ORT op library, when carried (.ort-lib): `run` in every stage then includes
# the native `ort` engine (the device cannot build the library: no ORT headers, no network)
if [ -f .ort-lib/libseqdeploy_ort.so ]; then
    export SEQDEPLOY_ORT_LIBRARY=$PWD/.ort-lib/libseqdeploy_ort.so
fi
# ort: 200 s more for DualDeltaRule (GPU tests whose float64 reference loop runs on the CPU,
# and validate lam)
BUDGET_ort=${BUDGET_ort:-440}
for stage in ${STAGES:-ort dlinoss lam moe cfc ten trt}; do
    start=$(date +%s)
    echo "=== $stage ($(date -u +%T))"
    case $stage in
    ten)
        timeout "$(budget ten 90)" python3 benchmarks/eigen_scan.py --json "$OUT/eigen_scan.json" 2>&1 \
            | grep -v Warning | tee "$OUT/eigen_scan.txt" ;;
    *)
        env -u STAGES timeout "$(budget "$stage" 240)" bash "benchmarks/${stage}_gpu.sh" > "$OUT/${stage}_stage.log" 2>&1
        tail -30 "$OUT/${stage}_stage.log" ;;
    esac
    echo "=== $stage done in $(( $(date +%s) - start )) s"
done
