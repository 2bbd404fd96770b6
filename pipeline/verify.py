"""Re-hash every file named by every manifest under a results folder.

Exits 1 and names each file that is missing or whose bytes changed since its stage wrote it.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.artifacts import verify

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="a results folder, e.g. results/sample")


def run(args: argparse.Namespace) -> int:
    checked, problems = verify(args.root)
    for problem in problems:
        log.error(problem)
    if problems:
        log.error("verify: %d problem(s) in %d file(s) checked under %s", len(problems), checked, args.root)
        return 1
    log.info("verify: %d file(s) under %s match their manifests", checked, args.root)
    return 0
