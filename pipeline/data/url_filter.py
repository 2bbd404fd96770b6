"""url_filter: drop WARC responses whose URL is on a block list, before extraction (FineWeb's
URL filter step runs ahead of trafilatura too, so blocked pages cost no extraction).

A list is a text file (or a URL the fetch_url_list rule downloads), one entry per line, `#`
comments; none is bundled. `domains` lists match a URL's host and every subdomain under it
(`example.com` blocks `a.example.com`, not `badexample.com` or `example.com.evil.org`);
`substrings` lists match anywhere in the lowercased URL. A response blocked by list `<name>` is
dropped as `url_blocklist:<name>` (the first list that matches, in config order), the entry that
matched in the removed file's `match` column.

Output: one row per response that passed (`record`: its place among its file's responses, id,
url, date, `source`: its file's shard name), which `extract` reads beside the WARC files; the
bytes are the record's HTTP block, passed on unchanged. A batch of WARC files
(inputs.warc_batch_size) is read file after file into one output, the rows of each file as its
own job would write them. Only `response` records count as documents; a file with none
fails naming the file and what it holds (a WET file points to inputs.wet).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import polars as pl

from pipeline.cli import json_arg
from pipeline.config import URL_SCHEMES, ConfigError, section_config
from pipeline.data.docs import REMOVED_COLUMNS, Doc
from pipeline.data.steps import Funnel, add_stage_arguments, require_files, write_stage_outputs
from pipeline.data.warc import batch_paths, response_records

log = logging.getLogger(__name__)

PASSED_COLUMNS: dict[str, pl.DataType] = {
    "record": pl.Int64, "id": pl.String, "url": pl.String, "date": pl.String, "source": pl.String,
}
URL_REMOVED_COLUMNS: dict[str, pl.DataType] = {**REMOVED_COLUMNS, "match": pl.String}


# ---------------------------------------------------------------------------------------------
# lists and matching

def read_list(path: str | os.PathLike) -> list[str]:
    """A block list's entries: stripped, lowercased, blank lines and `#` comments skipped."""
    with open(path, encoding="utf-8") as f:
        entries = (line.split("#", 1)[0].strip().lower() for line in f)
        return [entry for entry in entries if entry]


def host_of(url: str) -> str:
    try:
        return (urlsplit(url.strip()).hostname or "").rstrip(".")
    except ValueError:  # an unparsable URL (bad port, bracket) has no host to block
        return ""


def domain_match(host: str, domains: set[str]) -> str | None:
    """The entry of `domains` that is `host` or a parent domain of it (a.b.example.com ->
    a.b.example.com, b.example.com, example.com, com), or None."""
    parts = host.split(".")
    for i in range(len(parts)):
        if (candidate := ".".join(parts[i:])) in domains:
            return candidate
    return None


class UrlFilter:
    """Block lists as (name, kind, entries); `check(url)` -> (reason, matched entry) or None."""

    def __init__(self, lists: list[tuple[str, str, list[str]]]):
        self.lists = [(name, kind, set(entries) if kind == "domains" else sorted(set(entries)))
                      for name, kind, entries in lists]

    def check(self, url: str | None) -> tuple[str, str] | None:
        url = (url or "").lower()
        for name, kind, entries in self.lists:
            if kind == "domains":
                found = domain_match(host_of(url), entries)
            else:
                found = next((entry for entry in entries if entry in url), None)
            if found is not None:
                return f"url_blocklist:{name}", found
        return None


def block_lists(specs: list[dict[str, Any]], base: str | os.PathLike = ".") -> dict[str, str]:
    """`url_filter.lists` as {name: URL, or a local path relative to the current (Snakemake's
    working) folder, so a moved checkout keeps the rule's params}. A missing local file or a name
    used twice is a config error."""
    lists: dict[str, str] = {}
    for i, spec in enumerate(specs):
        if spec["name"] in lists:
            raise ConfigError(f"config key 'url_filter.lists[{i}].name': {spec['name']!r} is used twice")
        path = spec["path"]
        if not path.startswith(URL_SCHEMES):
            path = os.path.relpath(os.path.join(base, path))
            if not os.path.isfile(path):
                raise ConfigError(f"config key 'url_filter.lists[{i}].path': {path!r} is not a file")
        lists[spec["name"]] = path
    return lists


def load_filter(config: dict[str, Any], paths: dict[str, str]) -> UrlFilter:
    """The configured lists, read from `paths` (list name -> local file; URLs arrive downloaded)."""
    lists = []
    for spec in config["lists"]:
        if spec["name"] not in paths:
            raise ValueError(f"config key 'url_filter.lists': list {spec['name']!r} has no file (--lists)")
        lists.append((spec["name"], spec["kind"], read_list(paths[spec["name"]])))
    return UrlFilter(lists)


# ---------------------------------------------------------------------------------------------
# the stage


def url_filter(warc_path: str | Sequence[str], *, output: str, removed: str, manifest: str, config: dict[str, Any],
               lists: dict[str, str] | None = None) -> dict[str, Any]:
    """Filter one WARC file, or a batch of them (inputs.warc_batch_size) file after file."""
    config = section_config("url_filter", config)
    lists = lists or {}
    check = load_filter(config, lists)
    paths = batch_paths(warc_path)
    funnel, stats = Funnel(), Counter()

    def decide() -> Iterator[tuple[Doc, str | None, int]]:
        for shard, path in paths.items():
            for record, headers, _, block, _ in response_records(path, stats, funnel.errors):
                doc = {"record": record, "id": headers.get_header("WARC-Record-ID"),
                       "url": headers.get_header("WARC-Target-URI"), "date": headers.get_header("WARC-Date"),
                       "source": shard}
                blocked = check.check(doc["url"])
                if blocked is None:
                    yield doc, None, len(block)
                else:
                    yield {**doc, "text": "", "match": blocked[1]}, blocked[0], len(block)

    return write_stage_outputs("url_filter", decide(), funnel=funnel, docs_out=output,
                               removed_out=removed, manifest=manifest, config=config,
                               inputs=[*paths.values(), *(lists[name] for name in sorted(lists))],
                               kept_schema=PASSED_COLUMNS, removed_schema=URL_REMOVED_COLUMNS,
                               metrics={"record_types": stats})  # filled while the records stream


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, config_help="the `url_filter` config section as JSON (or @file)",
                        input_help="WARC files of `response` records (.warc.gz), read in order into one shard",
                        input_nargs="+")
    parser.add_argument("--lists", type=json_arg, default={},
                        help="JSON {list name: local file} for the lists in config (URLs downloaded first)")


def run(args: argparse.Namespace) -> int:
    require_files("url_filter", "WARC", args.input)
    url_filter(args.input, output=args.output, removed=args.removed, manifest=args.manifest,
               config=args.config, lists=args.lists)
    return 0
