"""Reading WARC streams, for every entry stage (ingest's WET conversions, url_filter's and extract's
responses): the file streamed (gzip per record, gzip as one member, or plain: told by its first
bytes), cut into records at `WARC/1.x` header lines a window at a time, each record framed by its
Content-Length and checked against the next header (ingest's docstring says how)."""

from __future__ import annotations

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
from typing import Any

from warcio.statusandheaders import StatusAndHeaders, StatusAndHeadersParser

from pipeline.config import warc_shard_name

log = logging.getLogger(__name__)

ERROR_CHARS = 200
REMOVED_PREVIEW_BYTES = 4096  # what an oversize record keeps of its body, for inspection
READ_CHUNK = 1 << 20
MAX_HEADER_BYTES = 1 << 16  # a WARC header block is a few hundred bytes
# what a damaged or cut file raises mid-stream: bad gzip data, a cut gzip member
STREAM_ERRORS = (zlib.error, gzip.BadGzipFile, OSError, EOFError)
# a record header: a WARC/1.x line at a line start, followed by a `Name: value` header line
RECORD_HEADER = re.compile(rb"WARC/1\.[01]\r?\n[A-Za-z][A-Za-z0-9-]*:")
_DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5}
_HEADERS = StatusAndHeadersParser(["WARC/1.0", "WARC/1.1"])


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


class NotWarc(NotWet):
    """An input under inputs.warc that holds no `response` records."""


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


def batch_paths(warc_path: str | Sequence[str]) -> dict[str, str]:
    """{shard name: path} of one WARC file or a batch of them, in order; two files of one name
    (the same stem in two folders) cannot be told apart in the passed list, so they fail."""
    paths: dict[str, str] = {}
    for path in [warc_path] if isinstance(warc_path, str) else warc_path:
        if (shard := warc_shard_name(path)) in paths:
            raise ValueError(f"WARC files {paths[shard]} and {path} both make source {shard!r}; rename one")
        paths[shard] = path
    return paths
