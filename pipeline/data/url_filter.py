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
from warcio.statusandheaders import StatusAndHeaders

from pipeline.cli import ConfigError, json_arg
from pipeline.config import URL_SCHEMES, section_config, warc_shard_name
from pipeline.data.docs import REMOVED_COLUMNS, Doc
from pipeline.data.ingest import NotWet, stream_records
from pipeline.data.steps import Funnel, add_stage_arguments, require_files, write_stage_outputs

log = logging.getLogger(__name__)

PASSED_COLUMNS: dict[str, pl.DataType] = {
    "record": pl.Int64, "id": pl.String, "url": pl.String, "date": pl.String, "source": pl.String,
}
URL_REMOVED_COLUMNS: dict[str, pl.DataType] = {**REMOVED_COLUMNS, "match": pl.String}


class NotWarc(NotWet):
    """An input under inputs.warc that holds no `response` records."""


# ---------------------------------------------------------------------------------------------
# reading a WARC file's responses (extract reads them the same way)

def response_records(path: str, stats: Counter,
                     errors: list[dict[str, Any]]) -> Iterator[tuple[int, StatusAndHeaders, int, bytes, str | None]]:
    """(place among responses, WARC headers, Content-Length, block, framing problem or None) for
    each `response` record, framed as ingest frames WET records. Other record types are counted
    in `stats`; a read error ends the file and is listed in `errors`."""
    read_errors: list[str] = []
    first, head, stream = stream_records(path, read_errors)
    if first is None or head[:first].strip():
        found = f"it begins {head[:60]!r}" if head else "it is empty"
        raise NotWarc(f"{path}: not a WARC file: no WARC/1.0 record header at its start ({found})")
    responses = 0
    for headers, length, block, problem in stream:
        kind = headers.get_header("WARC-Type") or "unknown"
        stats[f"records_{kind}"] += 1
        if kind == "response":
            yield responses, headers, length, block, problem
            responses += 1
    if responses == 0:
        types = ", ".join(f"{k.removeprefix('records_')}: {n}" for k, n in sorted(stats.items()))
        hint = "; a WET file of `conversion` records: list it under inputs.wet" if stats["records_conversion"] else ""
        raise NotWarc(f"{path}: not a WARC file of responses: no `response` record (found {types}){hint}")
    if read_errors:
        error = read_errors[0]
        errors.append({"file": path, "error": error, "records_before": responses})
        log.warning("%s: stream damaged after %d responses (%s); keeping those", path, responses, error)


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

def batch_paths(warc_path: str | Sequence[str]) -> dict[str, str]:
    """{shard name: path} of one WARC file or a batch of them, in order; two files of one name
    (the same stem in two folders) cannot be told apart in the passed list, so they fail."""
    paths: dict[str, str] = {}
    for path in [warc_path] if isinstance(warc_path, str) else warc_path:
        if (shard := warc_shard_name(path)) in paths:
            raise ValueError(f"WARC files {paths[shard]} and {path} both make source {shard!r}; rename one")
        paths[shard] = path
    return paths


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
