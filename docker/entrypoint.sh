#!/usr/bin/env bash
# Entrypoint of the sdfm images. No arguments, or arguments that start with "-": train through
# launch/run_train.sh, configured by its environment variables (SDFM_CONFIG, SDFM_RUN_DIR,
# NPROC_PER_NODE, NNODES, RDZV_ENDPOINT, MAX_RESTARTS, ...), the arguments appended as config
# overrides. Anything else runs as a command: `sdfm worker --run-dir ...`, `pytest`, `bash`.
set -euo pipefail
if [ "$#" = 0 ] || [ "${1:0:1}" = - ]; then
  exec "$(dirname "${BASH_SOURCE[0]}")/../launch/run_train.sh" "$@"
fi
exec "$@"
