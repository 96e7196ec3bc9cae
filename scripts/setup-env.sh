#!/usr/bin/env bash
# Create .venv (if needed) and install lsst-prod with its test extras. Idempotent.
# Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$PY" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
stamp="$ROOT/.venv/.lsst-prod-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
    python -m pip install --quiet -e "$ROOT[test]" 2>&1 | grep -v "is ignored" || true
    python -c "import lsst_prod, parsl, galsim, sep, fitsio" # fail loudly if the install did not work
    touch "$stamp"
fi
