#!/usr/bin/env python
"""Fuzz the configuration layer with many mutated campaign and site files (issue #9).

Runs the property-based tests of ``tests/test_hardening.py`` (hypothesis) with many more cases
than the test suite does: each case is a campaign or site file mutated by flipped or inserted
bytes, dropped/duplicated/re-indented lines, hostile scalars (huge numbers, .inf, alias bombs,
path traversal, control characters) or another encoding.  A case passes when loading it (and,
for a campaign, building its sky map) returns or raises ``ConfigError`` within 5 s; a traceback
or a hang fails the run, and hypothesis prints the smallest failing file.

Usage: python bench/fuzz_config.py [--campaigns N] [--sites N]      (defaults 10000 and 5000)
Figures: docs/performance.md ("Configuration fuzzing").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--campaigns", type=int, default=10_000, help="mutated campaign files (default 10000)")
    ap.add_argument("--sites", type=int, default=5_000, help="mutated site files (default 5000)")
    args = ap.parse_args()
    env = dict(os.environ, LSST_PROD_FUZZ_CAMPAIGNS=str(args.campaigns), LSST_PROD_FUZZ_SITES=str(args.sites))
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_hardening.py"), "-k", "fuzz",
                          "--hypothesis-show-statistics"], env=env, cwd=ROOT)
    dt = time.perf_counter() - t0
    verdict = "0 tracebacks, 0 hangs over 5 s" if rc == 0 else "FAILED (see the falsifying example above)"
    print(f"\nfuzzed {args.campaigns} campaign and {args.sites} site files in {dt:.0f} s: {verdict}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
