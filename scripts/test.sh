#!/usr/bin/env bash
# Runs the whole test suite. Creates (or reuses) .venv and installs the pinned
# requirements first, so it works on a fresh clone. Exits with pytest's status.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec python -m pytest "$@"
