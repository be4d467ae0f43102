#!/usr/bin/env bash
# Sets up the project (see launch/setup.sh) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/launch/setup.sh"
# shellcheck source=/dev/null
. "${SDFM_VENV:-$root/.venv}/bin/activate"
cd "$root"
export KEOPS_CACHE_FOLDER="${KEOPS_CACHE_FOLDER:-$root/.cache/keops}"
export SDFM_CACHE="${SDFM_CACHE:-$root/.cache/sdfm}"
export MPLBACKEND=Agg
set +e
# One pytest worker per core (SDFM_TEST_WORKERS: a number, or 0 for none), each on one thread with its
# own KeOps build folder (tests/conftest.py).
python -m pytest -q -ra --durations=15 -n "${SDFM_TEST_WORKERS:-auto}" --dist worksteal "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
if [ "$rc" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
