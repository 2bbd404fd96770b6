"""What every document stage shares: the funnel count, and read -> decide -> write -> manifest.

A stage is a `decide` function: given an iterator over the shard's documents (read a batch at a
time) it yields, for each one in order, the document (perhaps changed, e.g. lines removed) and
`None` to keep it or a reason string to drop it. `run_doc_stage` does the rest, the same way for
every stage: it counts documents and bytes in and out and drops per reason, writes the kept and
the removed documents as they are decided (memory holds a batch, not the shard), and writes the
job's manifest. `docs_in == docs_out + sum(dropped)` holds by construction and is checked.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from tqdm import tqdm

from pipeline.artifacts import write_manifest
from pipeline.data.docs import (REMOVED_COLUMNS, Doc, DocWriter, iter_docs, parquet_rows, parquet_schema,
                                text_bytes)

log = logging.getLogger(__name__)

Decision = tuple[Doc, str | None]
Decide = Callable[[Iterator[Doc]], Iterable[Decision]]


@dataclass
class Funnel:
    """Documents and bytes in and out of one stage, and drops per reason."""

    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_bytes: Counter = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)  # e.g. a damaged input file

    def take(self, nbytes: int) -> None:
        self.docs_in += 1
        self.bytes_in += nbytes

    def keep(self, nbytes: int) -> None:
        self.docs_out += 1
        self.bytes_out += nbytes

    def drop(self, reason: str, nbytes: int) -> None:
        self.dropped[reason] += 1
        self.dropped_bytes[reason] += nbytes

    def counts(self) -> dict[str, Any]:
        if self.docs_in != self.docs_out + sum(self.dropped.values()):
            raise AssertionError(f"funnel does not add up: {self.docs_in} in != {self.docs_out} out "
                                 f"+ {sum(self.dropped.values())} dropped")
        return {
            "docs_in": self.docs_in, "docs_out": self.docs_out,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_bytes": dict(sorted(self.dropped_bytes.items())),
            "errors": self.errors,
        }


def write_stage_outputs(stage: str, decisions: Iterable[tuple[Doc, str | None, int]], *, funnel: Funnel,
                        docs_out: str | os.PathLike, removed_out: str | os.PathLike,
                        manifest: str | os.PathLike, config: Any, inputs: list[str | os.PathLike],
                        kept_schema: dict[str, pl.DataType],
                        removed_schema: dict[str, pl.DataType] = REMOVED_COLUMNS,
                        metrics: dict[str, Any] | None = None, total: int | None = None) -> dict[str, Any]:
    """Count `decisions` and write the kept and the removed documents as they come (see tally),
    then the job manifest (last, so it never names a file that is not complete). An error raised
    while the decisions are read leaves neither file."""
    with DocWriter(docs_out, kept_schema) as kept, DocWriter(removed_out, removed_schema) as removed:
        tally(stage, decisions, funnel, kept, removed, total=total)
    counts = funnel.counts()
    log.info("%s: %d in, %d kept, %d dropped %s", stage, counts["docs_in"], counts["docs_out"],
             removed.rows, counts["dropped"])
    return write_manifest(manifest, stage=stage, config=config, inputs=inputs,
                          outputs={docs_out: kept.rows, removed_out: removed.rows},
                          counts=counts, metrics=metrics)


def tally(stage: str, decisions: Iterable[tuple[Doc, str | None, int]], funnel: Funnel,
          kept: DocWriter, removed: DocWriter, total: int | None = None) -> None:
    """Count (document, drop reason or None, bytes it came in with) and write each to the kept or
    the removed documents. A kept document counts its text's bytes out (a stage may have changed
    the text); one with no text yet (a WARC record before extraction) passes its bytes on unchanged."""
    for doc, reason, nbytes in tqdm(decisions, total=total, desc=stage, unit="doc", disable=None):
        funnel.take(nbytes)
        if reason is None:
            funnel.keep(text_bytes(doc) if "text" in doc else nbytes)
            kept.write(doc)
        else:
            funnel.drop(reason, nbytes)
            removed.write({**doc, "reason": reason})


def run_doc_stage(stage: str, decide: Decide, *, docs_in: str | os.PathLike,
                  docs_out: str | os.PathLike, removed_out: str | os.PathLike,
                  manifest: str | os.PathLike, config: Any,
                  removed_schema: dict[str, pl.DataType] = REMOVED_COLUMNS,
                  new_columns: dict[str, pl.DataType] | None = None,
                  metrics: dict[str, Any] | None = None,
                  extra_inputs: list[str | os.PathLike] = ()) -> dict[str, Any]:
    """Run `decide` over the documents of `docs_in` (checked against its stage's manifest first),
    streamed a batch at a time, and write everything the stage owes.

    Kept documents have the input's columns plus `new_columns` (langid's labels), also when
    none is kept, so every shard of a stage has one schema."""
    docs = iter_docs(docs_in)  # checked here, before anything is written
    total = parquet_rows(docs_in)
    sizes: deque[int] = deque()  # bytes in of the documents `decide` has taken and not yet decided

    def documents() -> Iterator[Doc]:
        for doc in docs:
            sizes.append(text_bytes(doc))
            yield doc

    def decisions() -> Iterator[tuple[Doc, str | None, int]]:
        for doc, reason in decide(documents()):
            if not sizes:
                raise AssertionError(f"{stage}: more decisions than documents of {docs_in}")
            yield doc, reason, sizes.popleft()
        if sizes or funnel.docs_in != total:  # one decision per document, in order
            raise AssertionError(f"{stage}: {funnel.docs_in} decisions for {total} documents of {docs_in}")

    funnel = Funnel()
    return write_stage_outputs(stage, decisions(), funnel=funnel, docs_out=docs_out, removed_out=removed_out,
                               manifest=manifest, config=config, inputs=[docs_in, *extra_inputs],
                               kept_schema={**parquet_schema(docs_in), **(new_columns or {})},
                               removed_schema=removed_schema, metrics=metrics, total=total)


def require_files(stage: str, kind: str, paths: list[str]) -> None:
    """Fail before anything is read when an input file (`kind`, e.g. "WET") is missing."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{stage}: input {kind} file {path} does not exist or is not a file")


def add_stage_arguments(parser, *, config_help: str, input_help: str = "input documents (parquet)",
                        input_nargs: str | None = None) -> None:
    """The arguments every per-shard document stage takes (ingest's input: WET files, `+`)."""
    from pipeline.cli import json_arg
    parser.add_argument("--input", required=True, nargs=input_nargs, help=input_help)
    parser.add_argument("--output", required=True, help="kept documents (parquet)")
    parser.add_argument("--removed", required=True, help="dropped documents with their reason (parquet)")
    parser.add_argument("--manifest", required=True, help="this job's manifest (json)")
    parser.add_argument("--config", type=json_arg, default={}, help=config_help)
