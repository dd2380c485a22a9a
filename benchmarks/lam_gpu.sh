#!/usr/bin/env bash
# The GPU evidence for `lam` (one device call, at most about 9.5 minutes; each step has its own
# timeout, most important first). Assumes
# `python3 -m pip install -q --no-deps --no-build-isolation -e .` already ran; installs nothing
# from the network. flash-linear-attention (pure Python over Triton: fla-core + einops) is
# installed from the wheels carried in .whl/ when present (carry the ignored folder .whl), else the benchmark
# says fla is unavailable and the fla test skips.
#   1. GPU tests of the op and the model (the registered op on CUDA runs the Triton kernels)
#   2. benchmarks/lam_dual_delta.py: kernel vs the seed's per-token loop vs fla (one memory)
#      at B=8 n=8 d=64 bf16, T=2048/128/512, with the default plans; the base encoder at B=1,
#      T=128 and 512 (measurements start only within --budget-s 75 s)
#   3. seqdeploy run lam --preset tiny on the GPU, long case T=1024 (time budget; the base
#      encoder's GPU latency is step 2's last lines)
#   4. (LAM_SWEEP=1) every design and tiling of kernels.LaunchPlan in one table
set -uo pipefail
# the prebuilt ORT op library, when carried (.ort-lib): the device cannot build it (no ORT
# headers, no network), and without it `run` and the end-to-end test leave out `ort`
if [ -f .ort-lib/libseqdeploy_ort.so ]; then
  export SEQDEPLOY_ORT_LIBRARY=$PWD/.ort-lib/libseqdeploy_ort.so
fi
O=${OUT:-/tmp/seqdeploy-out}
mkdir -p "$O"
if ls .whl/fla_core-*.whl >/dev/null 2>&1; then
  # fla-core holds fla.ops (the flash-linear-attention wheel adds only layers and models)
  python3 -m pip install -q --no-deps --no-index .whl/einops-*.whl .whl/fla_core-*.whl \
    >/dev/null 2>&1 || echo "fla wheels did not install"
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$O/lam_env.txt"
# the op's and the model's tests, in 12 pytest-xdist workers where xdist is installed (each
# JIT-compiles its kernels: on an H100 with 12 workers 47 tests had run after 150 s)
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
SEQDEPLOY_LAM_E2E=0 timeout 330 python3 -m pytest -q -p no:cacheprovider -rf --tb=line $XDIST \
  tests/test_lam_ops.py tests/test_lam_model.py 2>&1 | tail -15 | tee "$O/lam_pytest_gpu.txt"
timeout 90 python3 benchmarks/lam_dual_delta.py --budget-s 75 --json "$O/lam_dual_delta.json" 2>&1 | grep -v Warning \
  | tee "$O/lam_dual_delta.txt"
# `run` leaves out (and says why) an engine that cannot serve lam here: the native `ort` engine
# runs only with the carried library (.ort-lib, above); plain ONNX Runtime (ort-onnx) runs the
# fallback function.
timeout 150 seqdeploy run lam --preset tiny --out /tmp/seqdeploy-lam --long-seq 1024 --no-plot 2>&1 \
  | grep -v "^  \[" | tee "$O/run_lam.txt"
cp /tmp/seqdeploy-lam/lam/tiny/parity.json /tmp/seqdeploy-lam/lam/tiny/bench.json "$O/" 2>/dev/null
# 4. every design and tiling (precompiled in parallel first), when LAM_SWEEP=1 and time is left
if [ "${LAM_SWEEP:-0}" = "1" ]; then
  timeout 130 python3 benchmarks/lam_dual_delta.py --sweep --no-encoder --budget-s 110 \
    --json "$O/lam_sweep.json" 2>&1 | grep -v Warning | tee "$O/lam_sweep.txt"
fi
exit 0
