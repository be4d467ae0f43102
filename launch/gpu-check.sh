#!/usr/bin/env bash
# The one-shot GPU check: CUDA tests, a reduced `sdfm bench suite --workload gpu-check` and 200 steps
# of bf16 SD-FM training with the GPU potential worker, written to OUT/gpu-check.json and .md.
# About 8 minutes on one H100/H200, from a fresh copy of the repository.
#
#   launch/gpu-check.sh [--out DIR] [--wheels DIR] [--dry-run] [--quick] [other `sdfm bench gpu-check` flags]
#
# Python: $SDFM_PYTHON, else the project's .venv when ./launch/setup.sh made one, else python3. On a
# GPU machine without network whose Python already holds a CUDA build of torch, this script installs
# nothing from the network: it installs sdfm itself without dependencies, and the wheels found in
# --wheels DIR (small packages that Python lacks, e.g. tyro and its dependencies, pykeops, POT;
# launch/gpu-wheels.sh downloads them on a machine with network). A peer that is still absent is
# skipped with one line. --dry-run runs every step that needs no CUDA on a CPU machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

out="runs/gpu-check"
wheels=""
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) pass+=("$1"); shift ;;
  esac
done

if [ -n "${SDFM_PYTHON:-}" ]; then
  python="$SDFM_PYTHON"
elif [ -x "${SDFM_VENV:-$root/.venv}/bin/python" ]; then
  python="${SDFM_VENV:-$root/.venv}/bin/python"
else
  python="$(command -v python3)"
fi
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "error: $python has no torch; install a CUDA build of torch (or run ./launch/setup.sh on a CPU machine)" >&2
  exit 2
fi

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export KEOPS_CACHE_FOLDER="${KEOPS_CACHE_FOLDER:-$root/.cache/keops}"
export SDFM_CACHE="${SDFM_CACHE:-$root/.cache/sdfm}"

if [ -n "$wheels" ]; then
  # Into a private folder, never over the packages of the machine's Python (its torch stays as it is).
  site="$root/.cache/gpu-check-site"
  mkdir -p "$site"
  found=()
  for wheel in "$wheels"/*.whl; do
    case "$(basename "$wheel")" in
      sdfm-*) echo "gpu-check: ignoring $wheel: sdfm itself is installed from this checkout" ;;
      *) found+=("$wheel") ;;
    esac
  done
  if [ ${#found[@]} -gt 0 ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${found[@]}"
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# sdfm itself, without dependencies and without network (kernels/ installs as sdfm.kernels).
if ! "$python" -c "import sdfm.kernels, sys; sys.exit(0 if sdfm.__file__.startswith('$root/') else 1)" 2>/dev/null; then
  "$python" -m pip install -q --no-deps --no-build-isolation --no-index -e "$root" \
    || { echo "error: could not install sdfm from $root (pip install --no-deps -e . failed; see above)" >&2; exit 2; }
fi

missing="$("$python" - <<'EOF'
import importlib.util
need = ["tyro", "safetensors", "numpy", "scipy", "sklearn", "torchdiffeq", "matplotlib", "PIL", "tqdm", "tensorboard", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)"
if [ -n "$missing" ]; then
  echo "error: this Python lacks $missing, which sdfm needs; bring them as wheels: launch/gpu-wheels.sh DIR on a machine with network, then --wheels DIR" >&2
  exit 2
fi

mkdir -p "$out"
exec "$python" -m sdfm bench gpu-check --out "$out" "${pass[@]}"
