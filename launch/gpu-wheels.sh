#!/usr/bin/env bash
# Download the small wheels that a GPU machine's Python may lack, for `launch/gpu-check.sh --wheels DIR`
# on a machine without network: tyro (sdfm's CLI) and its dependencies, pykeops + keopscore, POT,
# GeomLoss, flash-sinkhorn and pytest-timeout. Pure-Python or manylinux x86_64 wheels for CPython 3.12 by default.
#
#   launch/gpu-wheels.sh DIR [PYTHON_VERSION]
#
# Not included: faiss-gpu (hundreds of MB; install it on the GPU machine with `pip install 'sdfm[gpu]'`
# where there is network, otherwise the FAISS GPU rows are skipped with one line) and torch (the GPU
# machine's own CUDA build is used).
set -euo pipefail
dir="${1:?usage: launch/gpu-wheels.sh DIR [PYTHON_VERSION]}"
version="${2:-3.12}"
mkdir -p "$dir"
packages=(
  "tyro==1.0.17" "docstring-parser==0.18.0" "typeguard==4.6.1" "typing-extensions==4.16.0"
  "pykeops==2.3" "keopscore==2.3" "pot==0.9.7.post1" "geomloss==0.3.1" "flash-sinkhorn==0.4.1"
  "pytest-timeout==2.4.0"
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# One package at a time: pure-Python packages that ship only sdists (keopscore, pykeops) are built
# into wheels here; the others come as binary wheels for the GPU machine's platform.
for spec in "${packages[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" -d "$dir" "$spec" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w "$dir" "$spec"
done
ls -1 "$dir"
