#!/usr/bin/env bash
# The demo: simulate the dp-mini survey, run the campaign on this machine, print the report and
# the validation against truth. Usage: bash scripts/demo.sh [REPO_DIR]   (default: ./demo-repo)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup-env.sh"
REPO="${1:-$ROOT/demo-repo}"
CAMPAIGN="$ROOT/campaigns/dp-mini.yaml"
lsst-prod simulate "$CAMPAIGN" --repo "$REPO"
set +e
lsst-prod submit "$CAMPAIGN" --repo "$REPO" | tee "$REPO/.last-submit.log"
status=${PIPESTATUS[0]}
set -e
RUN="$(tail -n 1 "$REPO/.last-submit.log")"
lsst-prod validate "$RUN" --repo "$REPO"
echo "run: $RUN   (lsst-prod report $RUN --repo $REPO [--json])"
exit "$status"
