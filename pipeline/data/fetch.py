"""fetch: download one input file (e.g. a WET file from data.commoncrawl.org) atomically.

The bytes stream into a temporary file beside the target and are renamed into place only when
the whole body arrived (checked against Content-Length when the server sends one), so an
interrupted download never looks like a WET file. A read that waits past `timeout_s`, a download
past `deadline_s`, or one slower than `min_bytes_per_s` over a `rate_window_s` fails (a server
trickling a byte every 20 s never trips a per-read timeout alone); Snakemake retries the rule.
"""

from __future__ import annotations

import argparse
import logging
import time
import urllib.request
from typing import Any

from tqdm import tqdm

from pipeline.artifacts import atomic_path
from pipeline.cli import json_arg
from pipeline.config import section_config

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class TooSlow(OSError):
    """A download past its deadline or under its minimum rate."""


def check_pace(url: str, config: dict[str, Any], start: float, now: float, window: list[float]) -> None:
    """Fail past the deadline, or when the rate window just closed under the minimum rate.
    `window` is [window start time, bytes at its start, bytes now]; it is moved on in place."""
    if now - start > config["deadline_s"]:
        raise TooSlow(f"fetch {url}: not done after {now - start:.0f} s (fetch.deadline_s {config['deadline_s']})")
    began, bytes_then, bytes_now = window
    if now - began >= config["rate_window_s"]:
        rate = (bytes_now - bytes_then) / (now - began)
        if rate < config["min_bytes_per_s"]:
            raise TooSlow(f"fetch {url}: {rate:.0f} bytes/s over the last {now - began:.0f} s, under "
                          f"fetch.min_bytes_per_s {config['min_bytes_per_s']}")
        window[:2] = [now, bytes_now]


def fetch(url: str, output: str, config: dict[str, Any] | None = None) -> int:
    """Download `url` to `output` within the `fetch` config's limits; return the bytes written."""
    config = section_config("fetch", config)
    request = urllib.request.Request(url, headers={"User-Agent": "wetstone-fetch/0.1"})
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=config["timeout_s"]) as response, atomic_path(output) as tmp:
        expected = response.headers.get("Content-Length")
        total = int(expected) if expected else None
        window = [start, 0, 0]
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="fetch", disable=None) as bar:
            while chunk := response.read1(CHUNK):  # whatever arrived: the pace is checked per read
                f.write(chunk)
                bar.update(len(chunk))
                window[2] = f.tell()
                check_pace(url, config, start, time.monotonic(), window)
            written = f.tell()
        if total is not None and written != total:
            raise OSError(f"fetch {url}: got {written} of {total} bytes (Content-Length); not keeping it")
    log.info("fetched %s -> %s (%d bytes)", url, output, written)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="http(s) URL")
    parser.add_argument("output", help="where to put it")
    parser.add_argument("--config", type=json_arg, default={}, help="the `fetch` config section as JSON (or @file)")


def run(args: argparse.Namespace) -> int:
    fetch(args.url, args.output, args.config)
    return 0
