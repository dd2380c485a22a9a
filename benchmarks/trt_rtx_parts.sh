#!/usr/bin/env bash
# Download TensorRT-RTX 1.7.1.116 for the GPU machine's Python (cp312) and split its 95 MB
# libraries wheel into parts that fit the device tool's 64 MiB a call, under .trt/ at the
# repository root (git-ignored through .git/info/exclude):
#   .trt/part00 (48 MiB)  .trt/part01 (the rest)  .trt/bindings.whl  .trt/SHA256SUMS
# Carry them in two device calls back to back (the machine stays warm between them):
#   call 1: carry [".trt/part00"]; command: mkdir -p /tmp/trtp && cp .trt/part00 /tmp/trtp/
#   call 2: carry [".trt/part01", ".trt/bindings.whl", ".trt/SHA256SUMS"]; command:
#           bash benchmarks/trt_gpu.sh
# benchmarks/trt_gpu.sh reassembles the wheel from /tmp/trtp and .trt, checks its sha256 and
# installs both wheels into /tmp/trtsite with no network.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.trt/' "$exclude" 2>/dev/null || echo '/.trt/' >> "$exclude"
mkdir -p .trt && cd .trt
libs=tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl
bind=tensorrt_rtx_cu13_bindings-1.7.1.116-cp312-none-manylinux_2_28_x86_64.whl
for dist in tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d . "$dist==1.7.1.116"
done
cp "$bind" bindings.whl
sha256sum "$libs" | sed "s/  .*/  libs.whl/" > SHA256SUMS
rm -f part0*
split -b 48M -d "$libs" part
ls -la part0* bindings.whl SHA256SUMS
