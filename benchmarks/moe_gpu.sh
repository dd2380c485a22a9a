#!/usr/bin/env bash
# The GPU evidence for `moe` (run on the device machine after
# `python3 -m pip install -q --no-deps --no-build-isolation -e .`; installs nothing):
# the moe GPU tests (Triton compiled for real), the MoE layer benchmark (bf16, N=8192, d=768,
# f=3072, E=8 and 64: layer vs mask loop vs torch._grouped_mm vs dense floor, then every plan of
# the experts op, the first design 'padded' among them, alone and in the layer), and
# `seqdeploy run moe` end to end on the tiny preset. Results under $OUT. About 5 minutes.
set -uo pipefail
# the prebuilt ORT op library, when carried (.ort-lib): the device cannot build it (no ORT
# headers, no network), and without it `run` and the end-to-end test leave out `ort`
if [ -f .ort-lib/libseqdeploy_ort.so ]; then
  export SEQDEPLOY_ORT_LIBRARY=$PWD/.ort-lib/libseqdeploy_ort.so
fi
O=${OUT:-/tmp/seqdeploy-out}
mkdir -p "$O"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$O/moe_card.txt"
timeout 900 python3 -m pytest -q -p no:cacheprovider -rf --tb=line tests/test_moe_ops.py tests/test_moe_model.py \
    2>&1 | tail -15 | tee "$O/moe_pytest_gpu.txt"
timeout 600 python3 benchmarks/moe_layer.py --json "$O/moe_layer.json" 2>&1 | grep -v Warning \
    | tee "$O/moe_layer.txt"
timeout 600 seqdeploy --out /tmp/seqdeploy-moe run moe --preset tiny --long-seq 1024 --no-plot 2>&1 \
    | grep -v "^  \[" | tail -60 | tee "$O/moe_run_tiny.txt"
cp /tmp/seqdeploy-moe/moe/tiny/parity.json "$O/moe_parity.json" 2>/dev/null
cp /tmp/seqdeploy-moe/moe/tiny/bench.json "$O/moe_bench.json" 2>/dev/null
exit 0
