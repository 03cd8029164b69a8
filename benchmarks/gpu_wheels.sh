#!/usr/bin/env bash
# Wheels that benchmarks/gpu_all.sh needs and the GPU image lacks, downloaded here into .whl/ (.gitignore; carried
# to the device machine, installed there with pip --no-index; see the run command at the top of gpu_all.sh).
#   mambapy: its pscan is the baseline of benchmarks/scan_gpu.py (pure Python; torch is already on the image).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any \
    -d .whl "mambapy==1.2.0"
ls -l .whl
