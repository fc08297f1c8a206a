#!/usr/bin/env python3
"""Render the generated results blocks of docs/results/README.md and docs/results/<suite>/README.md
from the committed suite files, or check that they are current (``--check``, run by a test).

Why a script and a check: a number in a results page that was copied by hand drifts from the data
the moment a suite is rerun. The block between ``<!-- results:begin -->`` and
``<!-- results:end -->`` is instead rendered by ``moelab.analysis.results`` from
``docs/results/<suite>/`` (suite.json, runs/*/summary.json, provenance.json, metrics.jsonl and
analysis.json), and ``--check`` fails when a committed block differs from what those files give.

Usage::

    python scripts/results_readme.py            # rewrite the blocks (make results runs this)
    python scripts/results_readme.py --check    # exit 1, naming the file, if a block is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="fail if a block is not current")
    p.add_argument(
        "--results",
        type=Path,
        default=ROOT / "docs" / "results",
        help="directory of the suite directories (default docs/results)",
    )
    args = p.parse_args(argv)
    from moelab.analysis.results import check_blocks, write_blocks

    if args.check:
        problems = check_blocks(args.results)
        for msg in problems:
            print(msg, file=sys.stderr)
        return 1 if problems else 0
    for path in write_blocks(args.results):
        print(f"rewrote the results block of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
