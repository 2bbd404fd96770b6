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
import base64
import gzip
import hashlib
import io
import itertools
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

from warcio.statusandheaders import StatusAndHeaders, StatusAndHeadersParser

from pipeline.config import section_config, shard_name
from pipeline.data.docs import DOC_COLUMNS, Doc
from pipeline.data.steps import Funnel, add_stage_arguments, require_files, write_stage_outputs

log = logging.getLogger(__name__)

REMOVED_PREVIEW_BYTES = 4096  # what an oversize record keeps of its body, for inspection
ERROR_CHARS = 200
WET_EXTRACTOR = "commoncrawl-wet"  # Common Crawl's own HTML-to-text conversion made the text
READ_CHUNK = 1 << 20
MAX_HEADER_BYTES = 1 << 16  # a WARC header block is a few hundred bytes
# what a damaged or cut file raises mid-stream: bad gzip data, a cut gzip member
STREAM_ERRORS = (zlib.error, gzip.BadGzipFile, OSError, EOFError)
# a record header: a WARC/1.x line at a line start, followed by a `Name: value` header line
RECORD_HEADER = re.compile(rb"WARC/1\.[01]\r?\n[A-Za-z][A-Za-z0-9-]*:")
_DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5}
_HEADERS = StatusAndHeadersParser(["WARC/1.0", "WARC/1.1"])


class DamagedInput(RuntimeError):
    """The WET stream broke off; raised only when config says a damaged file fails the job."""


class NotWet(ValueError):
    """An input that holds no WET conversion records."""


def digest_matches(header: str, body: bytes) -> bool | None:
    """Check a WARC digest header (`sha1:BASE32`, or hex); None when the algorithm is unknown."""
    algorithm, _, expected = header.partition(":")
    hasher = _DIGESTS.get(algorithm.lower())
    if hasher is None or not expected:
        return None
    digest = hasher(body).digest()
    return expected.upper() in (base64.b32encode(digest).decode(), digest.hex().upper())


def wet_chunks(path: str, errors: list[str]) -> Iterator[bytes]:
    """The file's bytes, READ_CHUNK at a time, gunzipped when it starts with the gzip magic (one
    member or many). A read error ends the stream and is appended to `errors`; read1 returns one
    gzip member's data at a time, so a damaged member loses only what follows it."""
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if raw.read(2) == b"\x1f\x8b" else raw
        raw.seek(0)
        try:
            while chunk := stream.read1(READ_CHUNK):
                yield chunk
        except STREAM_ERRORS as e:  # all mean the same: the stream broke here
            errors.append(f"{type(e).__name__}: {str(e)[:ERROR_CHARS]!r}")  # may quote binary garbage: escaped, cut


def find_header(data: bytes, pos: int = 0) -> int | None:
    """Offset of the first record header at or after `pos`, or None. bytes.find runs at memchr
    speed; a regex search with the line-start condition is ~10x slower on a 100 MB file."""
    while (at := data.find(b"WARC/1.", pos)) >= 0:
        if (at == 0 or data[at - 1] == 0x0A) and RECORD_HEADER.match(data, at):
            return at
        pos = at + 1
    return None


def last_header(data: bytearray, after: int) -> int | None:
    """Offset of the last record header past offset 0 that starts at or after `after`, or None."""
    end = len(data)
    while (at := data.rfind(b"WARC/1.", max(after, 1), end)) > 0:
        if data[at - 1] == 0x0A and RECORD_HEADER.match(data, at):
            return at
        end = at + 6  # the next try must end before this one
    return None


def windows(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    """The stream cut just before record headers: (bytes, whether a record header follows them).
    A window holds whole records; a header split between two chunks is found once both are in."""
    buffer = bytearray()
    for chunk in chunks:
        searched = max(len(buffer) - MAX_HEADER_BYTES, 0)  # earlier bytes hold no header (but one at 0)
        buffer += chunk
        cut = last_header(buffer, searched)
        if cut is not None:
            yield bytes(buffer[:cut]), True
            del buffer[:cut]
    yield bytes(buffer), False


Record = tuple[StatusAndHeaders, int, bytes, str | None]


def stream_records(path: str, read_errors: list[str]) -> tuple[int | None, bytes, Iterator[Record]]:
    """(offset of the first record header in `head` or None, `head`, every record of the file).

    `head` is the file's start: up to its first record header, or more than a header's bytes of
    anything else, or the whole file, so the caller can tell a WARC stream from other input
    before reading the rest. A read error ends the records and is appended to `read_errors`."""
    chunks = wet_chunks(path, read_errors)
    head = b""
    while (first := find_header(head)) is None and len(head.lstrip()) <= MAX_HEADER_BYTES:
        if not (chunk := next(chunks, b"")):
            break
        head += chunk
    windowed = windows(itertools.chain([head], chunks))
    return first, head, (record for data, followed in windowed for record in split_records(data, followed))


def split_records(data: bytes, followed: bool = False) -> Iterator[Record]:
    """(headers, Content-Length or -1, body, framing problem or None) for every record of an
    uncompressed WARC stream, or of a window of it (`followed`: a record header comes next).

    A record's body runs to the next record header; Content-Length must end there (give or take
    the blank lines between records), else the problem is `truncated` (the data ends first) or
    `length_mismatch`, and the body is cut at that header either way."""
    start = find_header(data)
    while start is not None:
        following = find_header(data, start + 1)
        body_end = len(data) if following is None else following
        stream = io.BytesIO(data[start:min(body_end, start + MAX_HEADER_BYTES)])  # a cut header stops there
        headers = _HEADERS.parse(stream)
        body_start = start + stream.tell()
        try:
            length = int(headers.get_header("Content-Length"))
        except (TypeError, ValueError):
            length = -1
        if length < 0:
            problem = "bad_header"
        elif body_start + length > body_end:
            problem = "truncated" if following is None and not followed else "length_mismatch"
        elif data[body_start + length:body_end].strip(b"\r\n"):
            problem = "length_mismatch"
        else:
            problem, body_end = None, body_start + length
        yield headers, length, data[body_start:body_end], problem
        start = following


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
