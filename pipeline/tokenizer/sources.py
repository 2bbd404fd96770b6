"""Where tokenizer text comes from: clean web shards and `inputs.text` corpora, read the same way.

A source is one clean WET shard (parquet with `id` and `text`) or one `inputs.text` corpus
(plain text with documents split by a separator line, or jsonl with a text field; either may be
.gz). Every document has a stable id: the WARC-Record-ID for web text, `<source>:<index>` for a
corpus (its position in the file), and three seeded, order-free decisions hang off that id:

- split: a document is `val` when the sha256 of its id, read as a number in [0, 1), falls under
  `val_fraction`. It depends on nothing but the id, so it is stable when shards change.
- weight: a source's weight w gives each train document floor(w) copies, plus one more when a
  second hash of its id falls under w - floor(w). So 1.0 keeps a source as is, 0.5 keeps half its
  documents, 2.5 repeats all twice and half a third time. Validation documents are never
  weighted: each is measured once.
- sample: the tokenizer trains on the train copies with the smallest seeded hash until
  `max_sample_bytes` is reached (all of them when the corpus is smaller).
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import ConfigError
from pipeline.records import open_text, read_jsonl, unit_hash
from pipeline.tokenizer.bpe import ENDOFTEXT


@dataclass(frozen=True)
class Source:
    """One input of the tokenizer stages. `format` is parquet (a clean web shard), text or jsonl."""

    name: str
    path: str
    format: str = "parquet"
    separator: str = ENDOFTEXT
    field: str = "text"
    weight: float = 1.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> Source:
        return cls(**(json.loads(text) if isinstance(text, str) else text))


def web_source(shard: str, clean_parquet: str) -> Source:
    return Source(name=shard, path=clean_parquet, format="parquet")


def text_sources(specs: list[dict[str, Any]], base: str | os.PathLike = ".",
                 taken: Iterable[str] = ()) -> dict[str, Source]:
    """`inputs.text` entries as {name: Source}. A path is resolved against `base` (the workflow
    folder), then written relative to the current (Snakemake's working) directory, so a moved
    checkout does not change the rule's params. A missing file, or a name used twice (or by a web
    shard, in `taken`), is a config error."""
    sources: dict[str, Source] = {}
    taken = set(taken)
    for i, spec in enumerate(specs):
        name = spec["name"]
        if name in sources or name in taken:
            raise ConfigError(f"config key 'inputs.text[{i}].name': {name!r} is already a source name; rename it")
        path = os.path.relpath(os.path.join(base, spec["path"]))
        if not os.path.isfile(path):
            raise ConfigError(f"config key 'inputs.text[{i}].path': {path!r} is not a file")
        sources[name] = Source(name=name, path=path, format=spec.get("format", "text"),
                               separator=spec.get("separator", ENDOFTEXT), field=spec.get("field", "text"),
                               weight=float(spec.get("weight", 1.0)))
    return sources


# --- reading ---------------------------------------------------------------------------------------

def _read_parquet(path: str) -> Iterator[tuple[str, str]]:
    """(id, text) of a clean shard, checked against the dedup manifest, a row group at a time."""
    # polars only here: a GPU machine running SFT or GRPO need not carry polars (docs/gpu.md)
    import polars as pl

    from pipeline.data.docs import iter_docs

    try:
        for doc in iter_docs(path, columns=["id", "text"]):
            yield doc["id"], doc["text"]
    except (OSError, pl.exceptions.PolarsError) as e:
        raise ValueError(f"{path}: not a document parquet with `id` and `text` columns ({e})") from e


def read_documents(source: Source, dropped: Counter | None = None) -> Iterator[tuple[str, str]]:
    """Yield (id, text) for each non-empty document of `source`, in file order.

    Empty documents (nothing but whitespace) are counted in `dropped["empty"]`. A jsonl line that
    is not a JSON object with a string `field` stops with an error naming the file and line."""
    dropped = dropped if dropped is not None else Counter()
    if source.format == "parquet":
        docs: Iterable[tuple[str, str]] = _read_parquet(source.path)
    elif source.format == "text":
        docs = ((f"{source.name}:{i}", text) for i, text in enumerate(_split_text(source)))
    elif source.format == "jsonl":
        docs = _read_jsonl(source)
    else:
        raise ValueError(f"source {source.name!r}: unknown format {source.format!r}")
    for doc_id, text in docs:
        if text is None or not text.strip():
            dropped["empty"] += 1
            continue
        yield doc_id, text


def _split_text(source: Source) -> Iterator[str]:
    """Documents of a plain-text corpus: the text between lines that hold only the separator,
    with surrounding whitespace stripped."""
    lines: list[str] = []
    with open_text(source.path) as f:
        for line in f:
            if line.strip() == source.separator:
                yield "".join(lines).strip()
                lines = []
            else:
                lines.append(line)
    yield "".join(lines).strip()


def _read_jsonl(source: Source) -> Iterator[tuple[str, str]]:
    for i, where, record in read_jsonl(source.path):
        if not isinstance(record.get(source.field), str):
            raise ValueError(f"{where}: no string field {source.field!r} (source {source.name!r})")
        yield f"{source.name}:{i}", record[source.field]


# --- seeded decisions ------------------------------------------------------------------------------

def is_val(doc_id: str, val_fraction: float) -> bool:
    return unit_hash(doc_id) < val_fraction


def copies(doc_id: str, weight: float) -> int:
    """How many times a train document of a source with this weight is used (see module doc)."""
    whole = math.floor(weight)
    return whole + (unit_hash(f"{doc_id}#weight") < weight - whole)


def smallest_until(items: Iterable[tuple[float, str]], max_bytes: int) -> list[str]:
    """Texts of the (key, text) items with the smallest keys (the earlier item on equal keys), in
    key order, taking items until their UTF-8 size reaches `max_bytes` (all of them when they hold
    less). Streams: memory holds only the current selection, never the whole corpus."""
    heap: list[tuple[float, int, int, str]] = []  # (-key, -position, bytes, text): the last to take on top
    total = 0
    for position, (key, text) in enumerate(items):
        if heap and total >= max_bytes and key >= -heap[0][0]:
            continue  # full, and this item would come after every selected one
        size = len(text.encode("utf-8"))
        heapq.heappush(heap, (-key, -position, size, text))
        total += size
        while total - heap[0][2] >= max_bytes:  # still full without the last item: drop it
            total -= heapq.heappop(heap)[2]
    return [text for *_, text in sorted(heap, reverse=True)]
