"""ingest: read a WET file (or a batch of them, in order) and turn its `conversion` records into documents.

The file is streamed (gzip per record as Common Crawl writes it, gzip as one member, or plain:
told by its first bytes, not its name) and cut into records at `WARC/1.0` (or 1.1) header lines,
a window of whole records at a time, so memory holds a read chunk and a record, not the file;
warcio parses each header block. A record's body is its Content-Length bytes, and those must end
where the next record header starts (only the blank-line separator between): a wrong
Content-Length loses no other record and keeps no text holding a record header, because every
record starts at the next header line after the previous one's header block.

Dropped, with the reason recorded, in this order: `oversize` (Content-Length over
`max_doc_bytes`; 4 kB kept for inspection), `bad_header` (no WARC-Record-ID or no valid
Content-Length, as when a file is cut inside a header), `truncated` (the file ends before
Content-Length bytes: never kept half), `length_mismatch` (Content-Length ends before or after the
next record header), `digest_mismatch` (WARC-Block-Digest disagrees with the bytes),
`invalid_utf8`, `empty` (nothing but whitespace). Other record types (warcinfo, request, ...)
are counted, not documents.

A file that holds no `conversion` record (empty, HTML, a WARC of responses) fails the job naming
the file and the record types found. A damaged gzip stream (or any read error mid-file) keeps
every good record before the damage; the job's counts name the file and the error, and the run
goes on unless `fail_on_damaged`.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

from warcio.statusandheaders import StatusAndHeaders

from pipeline.config import section_config, shard_name
from pipeline.data.docs import DOC_COLUMNS, Doc
from pipeline.data.steps import Funnel, add_stage_arguments, require_files, write_stage_outputs
from pipeline.data.warc import REMOVED_PREVIEW_BYTES, NotWet, digest_matches, stream_records

log = logging.getLogger(__name__)

WET_EXTRACTOR = "commoncrawl-wet"  # Common Crawl's own HTML-to-text conversion made the text


class DamagedInput(RuntimeError):
    """The WET stream broke off; raised only when config says a damaged file fails the job."""


def read_conversion_records(path: str, max_doc_bytes: int, check_digests: bool,
                            stats: Counter, errors: list[dict[str, Any]]) -> Iterator[tuple[Doc, str | None, int]]:
    """Yield (document, drop reason or None, body bytes) for each conversion record of `path`.

    A read error stops the file: it is recorded in `errors` and what came before it stands. A file
    with no conversion record raises NotWet naming what it holds instead."""
    shard = shard_name(path)
    read_errors: list[str] = []
    first, head, stream = stream_records(path, read_errors)
    if first is None or head[:first].strip():
        found = f"it begins {head[:60]!r}" if head else "it is empty"
        raise NotWet(f"{path}: not a WET file: no WARC/1.0 record header at its start ({found}"
                     f"{'; ' + read_errors[0] if read_errors else ''})")
    records = 0
    for headers, length, body, problem in stream:
        kind = headers.get_header("WARC-Type") or "unknown"
        stats[f"records_{kind}"] += 1
        if kind != "conversion":
            continue
        records += 1
        doc = {"id": headers.get_header("WARC-Record-ID"), "url": headers.get_header("WARC-Target-URI"),
               "date": headers.get_header("WARC-Date"), "source": shard, "text": "",
               "input": "wet", "extractor": WET_EXTRACTOR}
        if length > max_doc_bytes:
            doc["text"] = body[:REMOVED_PREVIEW_BYTES].decode("utf-8", errors="replace")
            yield doc, "oversize", length
            continue
        doc["text"] = body.decode("utf-8", errors="replace")
        yield doc, problem or _check(doc, body, headers, check_digests, stats), len(body)
    if records == 0:
        types = ", ".join(f"{k.removeprefix('records_')}: {n}" for k, n in sorted(stats.items())
                          if k.startswith("records_"))
        hint = ("; a WARC of `response` records: list it under inputs.warc, not inputs.wet"
                if stats["records_response"] else "")
        raise NotWet(f"{path}: not a WET file: no `conversion` record (found {types}){hint}"
                     f"{'; ' + read_errors[0] if read_errors else ''}")
    if read_errors:
        error = read_errors[0]
        errors.append({"file": path, "error": error, "records_before": records})
        log.warning("%s: stream damaged after %d conversion records (%s); keeping those", path, records, error)


def _check(doc: Doc, body: bytes, headers: StatusAndHeaders, check_digests: bool, stats: Counter) -> str | None:
    """The first reason a well-framed record cannot become a document, or None. Sets doc['text']
    when kept."""
    if not doc["id"]:
        return "bad_header"
    digest = headers.get_header("WARC-Block-Digest")
    if check_digests and digest:
        ok = digest_matches(digest, body)
        stats["digests_checked" if ok is not None else "digests_unknown_algorithm"] += 1
        if ok is False:
            return "digest_mismatch"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    text = text.lstrip("\ufeff")  # BOMs from the source page (sometimes several) are not text
    if not text.strip():
        return "empty"
    doc["text"] = text
    return None


def ingest(wet_path: str | Sequence[str], *, output: str, removed: str, manifest: str,
           config: dict[str, Any]) -> dict[str, Any]:
    """Ingest one WET file, or a batch of them (inputs.batch_size) into one shard, file after file;
    each document's `source` still names its own file."""
    config = section_config("ingest", config)
    paths = [wet_path] if isinstance(wet_path, str) else list(wet_path)
    funnel, stats = Funnel(), Counter()

    def records() -> Iterator[tuple[Doc, str | None, int]]:
        yield from chain.from_iterable(read_conversion_records(path, config["max_doc_bytes"], config["check_digests"],
                                                               stats, funnel.errors) for path in paths)
        if funnel.errors and config["fail_on_damaged"]:  # raised while writing: neither file is kept
            error = funnel.errors[0]
            raise DamagedInput(f"{error['file']}: {error['error']} after {error['records_before']} "
                               "records (ingest.fail_on_damaged is true)")

    return write_stage_outputs("ingest", records(), funnel=funnel, docs_out=output,
                               removed_out=removed, manifest=manifest, config=config, inputs=paths,
                               kept_schema=DOC_COLUMNS,
                               metrics={"record_types": stats})  # filled while the records stream


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, config_help="the `ingest` config section as JSON (or @file)",
                        input_help="WET files (.warc.wet.gz: gzip per record or whole, or plain), "
                                   "read in order into one shard", input_nargs="+")


def run(args: argparse.Namespace) -> int:
    require_files("ingest", "WET", args.input)
    ingest(args.input, output=args.output, removed=args.removed, manifest=args.manifest, config=args.config)
    return 0
