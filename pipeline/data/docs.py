"""Documents on disk: parquet files with fixed schemas, written atomically and deterministically.

A document is a dict. Kept documents carry DOC_COLUMNS (langid adds `lang` and `lang_score`);
dropped ones REMOVED_COLUMNS, with the reason and, for duplicates, the id they duplicate.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.artifacts import atomic_path, read_checked

Doc = dict[str, Any]

DOC_COLUMNS: dict[str, pl.DataType] = {
    "id": pl.String,        # WARC-Record-ID, e.g. <urn:uuid:...>
    "url": pl.String,       # WARC-Target-URI
    "date": pl.String,      # WARC-Date
    "source": pl.String,    # the input file's shard name
    "text": pl.String,
    "input": pl.String,     # provenance: "wet" or "warc"
    "extractor": pl.String, # what made the text: "commoncrawl-wet" (WET) or "trafilatura <version>"
}
LANG_COLUMNS: dict[str, pl.DataType] = {"lang": pl.String, "lang_score": pl.Float64}
REMOVED_COLUMNS: dict[str, pl.DataType] = {
    "id": pl.String, "url": pl.String, "source": pl.String, "reason": pl.String, "text": pl.String,
}
DEDUP_REMOVED_COLUMNS: dict[str, pl.DataType] = {**REMOVED_COLUMNS, "duplicate_of": pl.String}

# Fixed writer settings: the same rows always give the same bytes.
_PARQUET = dict(compression="zstd", compression_level=3, statistics=False, row_group_size=8192)


def read_frame(path: str | os.PathLike, columns: list[str] | None = None) -> pl.DataFrame:
    """A stage's parquet input, checked against the manifest of the job that wrote it."""
    return pl.read_parquet(io.BytesIO(read_checked(path)), columns=columns)


def read_docs(path: str | os.PathLike) -> list[Doc]:
    return read_frame(path).to_dicts()


def write_docs(path: str | os.PathLike, rows: Iterable[Doc], schema: dict[str, pl.DataType]) -> int:
    """Write `rows` (only the schema's columns, in its order) atomically; return the row count."""
    rows = list(rows)
    frame = pl.DataFrame([{k: row.get(k) for k in schema} for row in rows], schema=schema, orient="row")
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, **_PARQUET)
    return len(rows)


def text_bytes(doc: Doc) -> int:
    return len(doc["text"].encode("utf-8"))


def parquet_rows(path: str | os.PathLike) -> int:
    return pl.scan_parquet(Path(path)).select(pl.len()).collect().item()
