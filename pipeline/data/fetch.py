"""fetch: download one input file (e.g. a WET file from data.commoncrawl.org) atomically.

The bytes stream into a temporary file beside the target and are renamed into place only when
the whole body arrived (checked against Content-Length when the server sends one), so an
interrupted download never looks like a WET file. Snakemake retries the rule on failure.
"""

from __future__ import annotations

import argparse
import logging
import urllib.request

from tqdm import tqdm

from pipeline.artifacts import atomic_path

log = logging.getLogger(__name__)

TIMEOUT_S = 60


def fetch(url: str, output: str) -> int:
    """Download `url` to `output`; return the bytes written."""
    request = urllib.request.Request(url, headers={"User-Agent": "wetstone-fetch/0.1"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, atomic_path(output) as tmp:
        expected = response.headers.get("Content-Length")
        total = int(expected) if expected else None
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="fetch", disable=None) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            written = f.tell()
        if total is not None and written != total:
            raise OSError(f"fetch {url}: got {written} of {total} bytes (Content-Length); not keeping it")
    log.info("fetched %s -> %s (%d bytes)", url, output, written)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="http(s) URL")
    parser.add_argument("output", help="where to put it")


def run(args: argparse.Namespace) -> int:
    fetch(args.url, args.output)
    return 0
