#!/usr/bin/env bash
# The main job: set up, then export, optimise (FP16), validate and bench every built-in
# architecture at the preset that fits the hardware found (CPU: tiny, GPU: base).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec seqdeploy run "$@"
