"""extract: the main text of each HTML response in one WARC file (or a batch of them), with trafilatura.

Reads the WARC files beside the url_filter job's list of responses that passed (the same files,
in the same order, framed the same way), and for each of those, in order, drops with a reason or
keeps the page's main text (menus, sidebars and footers removed), as FineWeb does:

- framing, as ingest: `bad_header`, `truncated`, `length_mismatch`, then `digest_mismatch`
  (WARC-Block-Digest over the HTTP block);
- `http_status`: an HTTP status other than 200 (redirects, errors);
- `not_html`: a Content-Type (HTTP header; else Common Crawl's WARC-Identified-Payload-Type)
  not in `content_types`;
- `too_large`: a payload over `max_html_bytes`;
- `decode_error`: a chunked or compressed payload that does not decode, or bytes that no charset
  decodes. Charsets are tried in order: the HTTP header's, the page's `<meta charset>`, UTF-8,
  then charset_normalizer's detection; declared labels map as browsers map them (WHATWG:
  gb2312 -> gb18030, iso-8859-1 -> windows-1252), a declaration that fails falls through;
- `extraction_timeout`: trafilatura ran past `timeout_s` on this page (SIGALRM, so pure-C work
  is interrupted only when it returns to Python; `max_html_bytes` bounds that);
- `extraction_empty`: trafilatura found no main text.

Kept documents carry `input` "warc" and `extractor` "trafilatura <version>" (WET documents:
"wet", "commoncrawl-wet"). trafilatura's `deduplicate` cache is new per file, so a page's text
depends only on the pages before it in its own file: the same file gives the same bytes, alone
or in a batch.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import gzip
import io
import logging
import re
import signal
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import charset_normalizer
import polars as pl
import trafilatura
from trafilatura.deduplication import LRUCache
from trafilatura.settings import LRU_SIZE
from warcio.bufferedreaders import ChunkedDataReader
from warcio.statusandheaders import StatusAndHeaders, StatusAndHeadersParser

from pipeline.artifacts import read_manifest, upstream_manifest
from pipeline.config import section_config
from pipeline.data.docs import DOC_COLUMNS, REMOVED_COLUMNS, Doc, iter_docs, parquet_rows
from pipeline.data.steps import Funnel, add_stage_arguments, require_files, write_stage_outputs
from pipeline.data.warc import REMOVED_PREVIEW_BYTES, batch_paths, digest_matches, response_records

log = logging.getLogger(__name__)

EXTRACTOR = f"trafilatura {trafilatura.__version__}"
EXTRACT_REMOVED_COLUMNS: dict[str, pl.DataType] = {**REMOVED_COLUMNS, "detail": pl.String}
META_SCAN_BYTES = 4096  # a <meta charset> belongs in the first 1024 bytes (HTML spec); be lenient
_HTTP = StatusAndHeadersParser(["HTTP/1.0", "HTTP/1.1"], verify=False)  # HTTP/2 status lines too
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
# WHATWG Encoding Standard labels whose bytes are a superset codec in practice
_ALIASES = {"gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "iso-8859-1": "cp1252",
            "latin1": "cp1252", "us-ascii": "cp1252", "ascii": "cp1252", "iso-8859-9": "cp1254",
            "tis-620": "cp874", "iso-8859-11": "cp874", "ks_c_5601-1987": "cp949", "euc-kr": "cp949"}


class ExtractionTimeout(BaseException):
    """One page's extraction ran past `timeout_s`. A BaseException, so a broad `except
    Exception` inside the extractor cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ExtractionTimeout in this (main) thread when the block runs past `seconds`."""
    def expire(signum, frame):
        raise ExtractionTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# HTTP block -> HTML text

def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def declared_charset(content_type: str | None) -> str | None:
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip(" \"'"):
            return value.strip(" \"'")
    return None


def codec_name(label: str | None) -> str | None:
    """Python's codec for a charset label (browser aliases applied), or None if unknown."""
    if not label:
        return None
    label = _ALIASES.get(label.strip().lower(), label.strip().lower())
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def decode_html(payload: bytes, content_type: str | None) -> tuple[str, str] | None:
    """(text, how it was decoded) or None when no charset decodes the bytes cleanly."""
    meta = _META_CHARSET.search(payload[:META_SCAN_BYTES])
    tries = [("http_charset", codec_name(declared_charset(content_type))),
             ("meta_charset", codec_name(meta.group(1).decode("ascii", "replace")) if meta else None),
             ("utf-8", "utf-8")]
    for how, codec in tries:
        if codec is not None:
            try:
                return payload.decode(codec).lstrip("\ufeff"), how
            except (UnicodeDecodeError, LookupError):
                continue
    best = charset_normalizer.from_bytes(payload).best()
    if best is None:
        return None
    try:
        return payload.decode(best.encoding).lstrip("\ufeff"), "detected"
    except (UnicodeDecodeError, LookupError):
        return None


def http_payload(http: StatusAndHeaders, stream: io.BytesIO) -> bytes:
    """The payload with chunked transfer and gzip/deflate content encoding undone (Common Crawl
    stores payloads decoded and renames those headers X-Crawler-*; other crawlers may not). A
    payload that does not decode as its headers say raises: it is not guessed at."""
    payload = stream.read()
    if "chunked" in (http.get_header("Transfer-Encoding") or "").lower():
        payload = ChunkedDataReader(io.BytesIO(payload), raise_exceptions=True).read()
    encoding = (http.get_header("Content-Encoding") or "identity").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return gzip.decompress(payload)
    if encoding == "deflate":  # zlib-wrapped as the RFC says, or raw deflate as some servers send
        try:
            return zlib.decompress(payload)
        except zlib.error:
            return zlib.decompress(payload, -zlib.MAX_WBITS)
    if encoding != "identity":
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    return payload


# ---------------------------------------------------------------------------------------------
# the extractor

class Extractor:
    """trafilatura.extract with the configured options, a per-job dedup cache and a timeout."""

    def __init__(self, config: dict[str, Any]):
        self.options = dict(config["trafilatura"])
        if self.options["deduplicate"]:
            self.options["deduplicate"] = LRUCache(maxsize=LRU_SIZE)  # not trafilatura's global one
        self.timeout_s = config["timeout_s"]

    def __call__(self, html: str, url: str | None) -> str | None:
        """Main text, None when there is none; raises ExtractionTimeout."""
        with deadline(self.timeout_s):
            text = trafilatura.extract(html, url=url, output_format="txt", **self.options)
        return text if text and text.strip() else None


def read_html(headers: StatusAndHeaders, block: bytes, problem: str | None, config: dict[str, Any],
              stats: Counter) -> tuple[str | None, str, str]:
    """(drop reason or None, detail, the page's HTML as text, or a preview when dropped) of one
    response record: every check before extraction, in the module docstring's order."""
    if problem or not headers.get_header("WARC-Record-ID"):
        return problem or "bad_header", "", ""
    digest = headers.get_header("WARC-Block-Digest")
    if config["check_digests"] and digest:
        ok = digest_matches(digest, block)
        stats["digests_checked" if ok is not None else "digests_unknown_algorithm"] += 1
        if ok is False:
            return "digest_mismatch", digest, ""
    stream = io.BytesIO(block)
    http = _HTTP.parse(stream)
    if http.get_statuscode() != "200":
        return "http_status", http.statusline[:100], ""
    content_type = http.get_header("Content-Type")
    kind = media_type(content_type) or media_type(headers.get_header("WARC-Identified-Payload-Type"))
    if kind not in config["content_types"]:
        return "not_html", kind or "no Content-Type", ""
    try:
        payload = http_payload(http, stream)
    except (OSError, EOFError, zlib.error, ValueError) as e:  # gzip.BadGzipFile is an OSError
        return "decode_error", f"{type(e).__name__}: {str(e)[:200]}", ""
    preview = payload[:REMOVED_PREVIEW_BYTES].decode("utf-8", errors="replace")
    if len(payload) > config["max_html_bytes"]:
        return "too_large", f"{len(payload)} bytes", preview
    decoded = decode_html(payload, content_type)
    if decoded is None:
        return "decode_error", f"no charset decodes it (declared {declared_charset(content_type)!r})", preview
    html, how = decoded
    stats[f"charset_{how}"] += 1
    return None, "", html


def judge(headers: StatusAndHeaders, block: bytes, problem: str | None, config: dict[str, Any],
          extractor: Extractor, stats: Counter) -> tuple[str | None, str, str]:
    """(drop reason or None, detail, text) for one response record that passed url_filter."""
    reason, detail, html = read_html(headers, block, problem, config, stats)
    if reason is not None:
        return reason, detail, html
    try:
        text = extractor(html, headers.get_header("WARC-Target-URI"))
    except ExtractionTimeout:
        return "extraction_timeout", f"over {config['timeout_s']} s", html[:REMOVED_PREVIEW_BYTES]
    if text is None:
        return "extraction_empty", "", html[:REMOVED_PREVIEW_BYTES]
    return None, "", text


# ---------------------------------------------------------------------------------------------
# the stage

def extract(warc_path: str | Sequence[str], passed: str, *, output: str, removed: str, manifest: str,
            config: dict[str, Any]) -> dict[str, Any]:
    """Extract the responses of `warc_path` (a file, or a batch in url_filter's order) that
    url_filter passed (`passed`, checked against its manifest). A `passed` list of another
    version of the files fails naming both."""
    config = section_config("extract", config)
    rows = iter_docs(passed)  # in the order of the files' responses, as url_filter wrote them
    wanted = parquet_rows(passed)
    responses = read_manifest(upstream_manifest(passed))["counts"]["docs_in"]  # url_filter saw these
    paths = batch_paths(warc_path)
    funnel, stats = Funnel(), Counter()
    found = seen = 0

    def decide() -> Iterator[tuple[Doc, str | None, int]]:
        nonlocal found, seen
        row = next(rows, None)
        for shard, path in paths.items():
            extractor = Extractor(config)  # a fresh dedup cache: a file's text is its own, batched or not
            for record, headers, _, block, problem in response_records(path, stats, funnel.errors):
                seen += 1
                if row is None or (row["source"], row["record"]) != (shard, record):  # url_filter dropped it
                    continue
                if row["id"] != headers.get_header("WARC-Record-ID"):
                    raise ValueError(f"{passed} is stale for {path}: response {record} is "
                                     f"{headers.get_header('WARC-Record-ID')}, url_filter saw {row['id']}; rerun url_filter")
                found += 1
                reason, detail, text = judge(headers, block, problem, config, extractor, stats)
                doc = {"id": row["id"], "url": row["url"], "date": row["date"], "source": shard, "text": text,
                       "input": "warc", "extractor": EXTRACTOR}
                yield (doc, None, len(block)) if reason is None else ({**doc, "detail": detail}, reason, len(block))
                row = next(rows, None)
        if found != wanted or seen != responses:  # raised while writing: neither file is kept
            raise ValueError(f"{passed} is stale for {', '.join(paths.values())}: url_filter saw {responses} "
                             f"responses and passed {wanted}; the files have {seen}, {found} of those; rerun url_filter")

    return write_stage_outputs("extract", decide(), funnel=funnel, docs_out=output, total=wanted,
                               removed_out=removed, manifest=manifest, config=config, inputs=[*paths.values(), passed],
                               kept_schema=DOC_COLUMNS, removed_schema=EXTRACT_REMOVED_COLUMNS,
                               metrics={"extractor": EXTRACTOR, "records": stats})  # filled while the records stream


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, config_help="the `extract` config section as JSON (or @file)",
                        input_help="WARC files of `response` records (.warc.gz), in url_filter's order",
                        input_nargs="+")
    parser.add_argument("--passed", required=True, help="url_filter's list of responses that passed (parquet)")


def run(args: argparse.Namespace) -> int:
    require_files("extract", "WARC", args.input)
    extract(args.input, args.passed, output=args.output, removed=args.removed, manifest=args.manifest,
            config=args.config)
    return 0
