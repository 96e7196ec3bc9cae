#!/usr/bin/env bash
# Set up (fresh machine: venv + pip) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup-env.sh"
cd "$ROOT"
python -m pytest -q "$@"
