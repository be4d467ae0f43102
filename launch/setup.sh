#!/usr/bin/env bash
# Creates .venv (if missing) and installs sdfm with everything it needs. Idempotent: a second run
# only checks that the install is current.
#   TORCH_SPEC   torch requirement installed first (default torch==2.13.0, a CPU build here;
#                e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")
#   SDFM_VENV    where the virtual environment lives (default .venv in the repository)
#   PYTHON       interpreter used to create it (default python3)
#   SDFM_EXTRAS  extras to install (default dev,cpu; on a GPU machine dev,gpu: faiss-gpu for faiss-cpu)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${SDFM_VENV:-$root/.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
pip=("$venv/bin/python" -m pip)

# Fashion-MNIST comes from Debian's package; install it when we can (root, apt present).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    >/dev/null 2>&1 || echo "[setup] warning: could not install dataset-fashion-mnist; Fashion-MNIST runs and tests will be skipped"
fi

# Stamp: skip pip when neither pyproject.toml nor the torch pin changed since the last install.
stamp="$venv/.sdfm-installed"
want="$(sha256sum pyproject.toml | cut -c1-64) $torch_spec ${SDFM_EXTRAS:-dev,cpu}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import sdfm, torch" 2>/dev/null; then
  exit 0
fi

echo "[setup] installing $torch_spec"
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options such as --index-url
"${pip[@]}" install -q $torch_spec
torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$venv/.torch-constraint.txt"
echo "torch==$torch_version" > "$constraints"
echo "[setup] installing sdfm and its dependencies (torch held at $torch_version)"
"${pip[@]}" install -q -c "$constraints" -e ".[${SDFM_EXTRAS:-dev,cpu}]"
echo "$want" > "$stamp"
echo "[setup] done: $venv"
