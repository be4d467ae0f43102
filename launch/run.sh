#!/usr/bin/env bash
# Sets up the project (see launch/setup.sh) and runs a training job, then samples and evaluates it.
#   SDFM_CONFIG  preset to train (default launch/configs/default.toml)
#   SDFM_RUN_DIR run folder (default runs/<preset name>)
# Extra arguments are passed to `sdfm train`, e.g. ./launch/run.sh --train.steps 500 --overwrite
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/launch/setup.sh"
# shellcheck source=/dev/null
. "${SDFM_VENV:-$root/.venv}/bin/activate"
export KEOPS_CACHE_FOLDER="${KEOPS_CACHE_FOLDER:-$root/.cache/keops}"
config="${SDFM_CONFIG:-$root/launch/configs/default.toml}"
name="$(basename "$config" .toml)"
run_dir="${SDFM_RUN_DIR:-$root/runs/$name}"
exec sdfm train --config "$config" --run-dir "$run_dir" "$@"
