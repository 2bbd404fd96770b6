"""ingest: stream one WET file with warcio and turn its `conversion` records into documents.

Each record's body is read whole and checked before it becomes a document. Dropped, with the
reason recorded, in this order: `oversize` (Content-Length over `max_doc_bytes`; not read into
memory), `bad_header` (no WARC-Record-ID or no Content-Length, as when a file is cut inside a
header), `truncated` (fewer bytes than Content-Length: never kept half), `digest_mismatch`
(WARC-Block-Digest disagrees with the bytes), `invalid_utf8`, `empty` (nothing but whitespace).
Other record types (warcinfo, request, ...) are counted, not documents.

A damaged gzip stream (or any read error mid-file) keeps every good record before the damage;
the job's counts name the file and the error, and the run goes on unless `fail_on_damaged`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from pipeline.cli import json_arg
from pipeline.config import section_config, shard_name
from pipeline.data.docs import DOC_COLUMNS, Doc
from pipeline.data.steps import Funnel, write_stage_outputs

log = logging.getLogger(__name__)

REMOVED_PREVIEW_BYTES = 4096  # what an oversize record keeps of its body, for inspection
ERROR_CHARS = 200
# what a damaged or cut file raises mid-stream: bad gzip data, bad WARC framing, a bad header value
STREAM_ERRORS = (ArchiveLoadFailed, zlib.error, OSError, EOFError, ValueError)
_DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5}


class DamagedInput(RuntimeError):
    """The WET stream broke off; raised only when config says a damaged file fails the job."""


def digest_matches(header: str, body: bytes) -> bool | None:
    """Check a WARC digest header (`sha1:BASE32`, or hex); None when the algorithm is unknown."""
    algorithm, _, expected = header.partition(":")
    hasher = _DIGESTS.get(algorithm.lower())
    if hasher is None or not expected:
        return None
    digest = hasher(body).digest()
    return expected.upper() in (base64.b32encode(digest).decode(), digest.hex().upper())


def read_conversion_records(path: str, max_doc_bytes: int, check_digests: bool,
                            stats: Counter, errors: list[dict[str, Any]]) -> Iterator[tuple[Doc, str | None, int]]:
    """Yield (document, drop reason or None, body bytes) for each conversion record of `path`.

    A read error stops the file: it is recorded in `errors` and what came before it stands."""
    shard = shard_name(path)
    records = 0
    try:
        with open(path, "rb") as stream:
            for record in ArchiveIterator(stream):
                stats[f"records_{record.rec_type}"] += 1
                if record.rec_type != "conversion":
                    continue
                records += 1
                headers = record.rec_headers
                length = int(headers.get_header("Content-Length") or -1)  # -1: missing (a cut header)
                doc = {"id": headers.get_header("WARC-Record-ID"), "url": headers.get_header("WARC-Target-URI"),
                       "date": headers.get_header("WARC-Date"), "source": shard, "text": ""}
                if length > max_doc_bytes:
                    preview = record.content_stream().read(REMOVED_PREVIEW_BYTES)
                    doc["text"] = preview.decode("utf-8", errors="replace")
                    yield doc, "oversize", length
                    continue
                body = record.content_stream().read()
                doc["text"] = body.decode("utf-8", errors="replace")
                yield (doc, _check(doc, body, length, headers, check_digests, stats), len(body))
    except STREAM_ERRORS as e:  # all mean the same: the stream broke here
        error = f"{type(e).__name__}: {str(e)[:ERROR_CHARS]!r}"  # may quote binary garbage: escaped, cut
        errors.append({"file": path, "error": error, "records_before": records})
        log.warning("%s: stream damaged after %d conversion records (%s); keeping those", path, records, error)


def _check(doc: Doc, body: bytes, length: int, headers, check_digests: bool, stats: Counter) -> str | None:
    """The first reason a record cannot become a document, or None. Sets doc['text'] when kept."""
    if not doc["id"] or length < 0:
        return "bad_header"
    if len(body) < length:
        return "truncated"
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


def ingest(wet_path: str, *, output: str, removed: str, manifest: str, config: dict[str, Any]) -> dict[str, Any]:
    config = section_config("ingest", config)
    funnel, stats = Funnel(), Counter()
    kept, dropped = [], []
    errors = funnel.errors
    records = read_conversion_records(wet_path, config["max_doc_bytes"], config["check_digests"], stats, errors)
    for doc, reason, nbytes in tqdm(records, desc="ingest", unit="rec", disable=None):
        funnel.take(nbytes)
        if reason is None:
            funnel.keep(len(doc["text"].encode("utf-8")))
            kept.append(doc)
        else:
            funnel.drop(reason, nbytes)
            dropped.append({**doc, "reason": reason})
    if errors and config["fail_on_damaged"]:
        raise DamagedInput(f"{wet_path}: {errors[0]['error']} after {errors[0]['records_before']} "
                           "records (ingest.fail_on_damaged is true)")
    return write_stage_outputs("ingest", kept=kept, removed=dropped, funnel=funnel, docs_out=output,
                                 removed_out=removed, manifest=manifest, config=config, inputs=[wet_path],
                                 kept_schema=DOC_COLUMNS, metrics={"record_types": dict(sorted(stats.items()))})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="a WET file (.warc.wet.gz, gzip multi-member or plain)")
    parser.add_argument("--output", required=True, help="kept documents (parquet)")
    parser.add_argument("--removed", required=True, help="dropped records with their reason (parquet)")
    parser.add_argument("--manifest", required=True, help="this job's manifest (json)")
    parser.add_argument("--config", type=json_arg, default={}, help="the `ingest` config section as JSON (or @file)")


def run(args: argparse.Namespace) -> int:
    if not os.path.exists(args.input):
        raise FileNotFoundError(f"ingest: input WET file {args.input} does not exist")
    ingest(args.input, output=args.output, removed=args.removed, manifest=args.manifest, config=args.config)
    return 0
