#!/usr/bin/env bash
# Stage the wheels a GPU machine with NO package index needs to run benchmarks/gpu_check.py (or the
# training recipe): the packages the project uses that a stock CUDA + PyTorch image lacks, built or
# downloaded HERE for the TARGET's Python, into one folder that travels with the code.
#
#   benchmarks/stage_wheels.sh [DEST=.whl] [PYTHON_VERSION=3.12]
#   # on the GPU machine, before the check (no index needed):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site
#
# Assumes the target has torch, transformers, tokenizers, safetensors, numpy, scipy, pillow, pyyaml,
# pyarrow, psutil, einops, msgpack, ninja, py-cpuinfo, tqdm (a stock PyTorch/transformers image; check
# with `pip show`). Wheels for anything else are listed below; versions are the ones the project is
# tested with. deepspeed publishes an sdist only: it is built here into a pure-Python wheel (no ops
# compiled; they JIT-compile on the target on first use, which needs nvcc + ninja there).
set -euo pipefail
DEST=${1:-.whl}
PYV=${2:-3.12}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# compiled packages: the target interpreter's binary wheels
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${PLATFORMS[@]}" \
    -d "$DEST" pydantic==2.14.4 pydantic-core pycocotools==2.0.11
# pure-Python packages: any platform
$PIP download -q --no-deps --only-binary=:all: -d "$DEST" annotated-types typing-inspection hjson \
    segment-anything==1.0
# pydantic pins one pydantic-core: keep exactly that one
CORE=$(unzip -p "$DEST"/pydantic-2.14.4-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
if [ -n "$CORE" ]; then
    find "$DEST" -name 'pydantic_core-*.whl' ! -name "pydantic_core-$CORE-*" -delete
    ls "$DEST"/pydantic_core-"$CORE"-* >/dev/null 2>&1 || $PIP download -q --no-deps --only-binary=:all: \
        --python-version "$PYV" --implementation cp "${PLATFORMS[@]}" -d "$DEST" "pydantic-core==$CORE"
fi
# deepspeed: sdist -> pure-Python wheel, ops not prebuilt
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8 \
    || DS_BUILD_OPS=0 $PIP wheel -q --no-deps -w "$DEST" deepspeed==0.19.8
du -sh "$DEST"; ls -1 "$DEST"
