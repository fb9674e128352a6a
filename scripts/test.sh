#!/usr/bin/env bash
# Runs the whole test suite. Creates (or reuses) .venv and installs the pinned
# requirements first, so it works on a fresh clone. Exits with pytest's status.
# Tests run in TEST_WORKERS processes (pytest-xdist; default 2): most of their time
# is XLA compiling on one core, so two workers took a 2-core machine's suite from
# 20 to 11 minutes. TEST_WORKERS=0 runs them in this process.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec python -m pytest -n "${TEST_WORKERS:-2}" "$@"
