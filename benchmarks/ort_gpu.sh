#!/usr/bin/env bash
# GPU evidence for issue 18 (the `ort` engine's native op library), for the device tool.
#
# Prepare on the CI machine (the device has no network, so no ORT headers to build against):
#   mkdir -p .ort-lib && cp "$(seqdeploy build-ort-ops | tail -1)" .ort-lib/
# and carry `.ort-lib` (a few MB) with the onnxruntime-gpu wheel installed in /tmp/site
# (../shared/DEVICE.md). Assumes `python3 -m pip install -q --no-deps --no-build-isolation -e .`
# ran. Writes everything under $OUT; prints a short table last. About 3-4 minutes on an H100
# before the lam steps (estimated 2-3 more: not yet run on a GPU).
set -uo pipefail
O=${OUT:-/tmp/seqdeploy-out}
mkdir -p "$O"
EX=/tmp/seqdeploy-ort-ex
if [ -f .ort-lib/libseqdeploy_ort.so ]; then
  export SEQDEPLOY_ORT_LIBRARY=$PWD/.ort-lib/libseqdeploy_ort.so
fi
CPU_PYTHONPATH=${PYTHONPATH:-}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import onnxruntime as o; print('onnxruntime-gpu', o.__version__, o.get_available_providers())"
  PYTHONPATH=$CPU_PYTHONPATH python3 -c "import onnxruntime as o; print('onnxruntime (cpu)', o.__version__)"
  echo "library: ${SEQDEPLOY_ORT_LIBRARY:-built here}"
} 2>&1 | tee "$O/ort_env.txt"

# GPU tests: every op's CUDA kernel on ORT's CUDA provider vs the torch op and the float64 loop,
# and the CPU kernels again, in onnxruntime-gpu 1.31 (the float64 loops of the moe and lam
# cases take about two minutes of host time) ...
timeout 300 python3 -m pytest -q -p no:cacheprovider -rf --tb=line tests/test_ort.py \
  -k "cuda or cpu_kernel or runs_not or version or ort_graph" 2>&1 | tail -15 | tee "$O/ort_pytest_gpu.txt"
# ... and the library loading into the device's CPU-only onnxruntime 1.30
PYTHONPATH=$CPU_PYTHONPATH timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_ort.py \
  -k "runs_not or version" 2>&1 | tail -4 | tee "$O/ort_pytest_cpu_ort.txt"

S="seqdeploy --out $EX"
timeout 150 bash -c "$S export ten --preset base >/dev/null && $S optimize ten --preset base >/dev/null" \
  2>&1 | tail -3
timeout 60 bash -c "$S export cfc --preset seed >/dev/null && $S optimize cfc --preset seed >/dev/null" \
  2>&1 | tail -3
timeout 200 $S bench ten --preset base --engine torch,ort,ort-graph,ort-onnx --batch 16 --seq-len 2048 \
  --precision fp16 2>&1 | grep -v "^  \[" | tee "$O/ort_bench_ten.txt"
cp $EX/ten/base/bench.json "$O/ort_bench_ten.json" 2>/dev/null
timeout 120 $S bench cfc --preset seed --engine torch,ort,ort-graph,ort-onnx --precision fp16 2>&1 \
  | grep -v "^  \[" | tee "$O/ort_bench_cfc.txt"
cp $EX/cfc/seed/bench.json "$O/ort_bench_cfc.json" 2>/dev/null
timeout 150 $S validate cfc --preset seed --engine ort --engine ort-graph --precision fp32 --precision fp16 2>&1 \
  | tail -6 | tee "$O/ort_validate_cfc.txt"
cp $EX/cfc/seed/parity.json "$O/ort_parity_cfc.json" 2>/dev/null
timeout 200 $S validate ten --preset base --engine ort --engine ort-graph --precision fp32 --precision fp16 \
  --long-seq 2048 2>&1 | tail -6 | tee "$O/ort_validate_ten.txt"
cp $EX/ten/base/parity.json "$O/ort_parity_ten.json" 2>/dev/null
# ORT's own per-call floor on the CUDA EP (a one-node Identity graph, the engine's IO-binding
# path) at the cfc seed's shapes: no model runs faster through `ort` there
timeout 60 python3 benchmarks/ort_floor.py --json "$O/ort_floor.json" 2>&1 | tee "$O/ort_floor.txt"
# lam tiny through the library's DualDeltaRule (recurrent kernel at T = 1, chunked WY/UT above 16)
timeout 100 bash -c "$S export lam --preset tiny >/dev/null && $S optimize lam --preset tiny >/dev/null \
  && $S validate lam --preset tiny --engine ort --precision fp32 --precision fp16 --long-seq 2048" \
  2>&1 | tail -6 | tee "$O/ort_validate_lam.txt"
cp $EX/lam/tiny/parity.json "$O/ort_parity_lam.json" 2>/dev/null

# the table: ort (and ort-graph, its CUDA-graph replays) against torch (target <= 1.3x its
# time) and ort-onnx (target >= 20x faster)
python3 - "$O" <<'PY' | tee "$O/ort_summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'arch':5} {'BxT':>9} {'torch ms':>9} {'ort ms':>9} {'graph ms':>9} {'ort-onnx ms':>11} "
      f"{'ort/torch':>9} {'graph/torch':>11} {'onnx/ort':>9} {'onnx/graph':>10}")
for arch in ("ten", "cfc"):
    p = out / f"ort_bench_{arch}.json"
    if not p.exists():
        print(arch, "no bench.json"); continue
    b = json.loads(p.read_text())
    rows = {}
    for r in b["engines"]:
        rows.setdefault((r["batch"], r["seq_len"]), {})[r["engine"]] = r["median_ms"]
    for (bb, t), e in rows.items():
        to, o, g, f = (e.get(k) for k in ("torch", "ort", "ort-graph", "ort-onnx"))
        ratio = lambda a, c: f"{a / c:.2f}" if a and c else "-"
        print(f"{arch:5} {f'{bb}x{t}':>9} {to or 0:9.3f} {o or 0:9.3f} {g or 0:9.3f} {f or 0:11.3f} "
              f"{ratio(o, to):>9} {ratio(g, to):>11} {ratio(f, o):>9} {ratio(f, g):>10}   ({b.get('gpu')})")
PY
