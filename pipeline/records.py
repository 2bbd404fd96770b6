"""Readers and seeded hashes that several stages share: jsonl records with a location for errors,
text files gzipped or not, and the hash that makes order-free, seeded decisions (splits, weights)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any


def open_text(path: str) -> io.TextIOBase:
    """A UTF-8 text file, gunzipped when its name ends in .gz; newlines kept as they are."""
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def read_jsonl(path: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line index, "<path> line <n>", record) for every non-blank line of a jsonl file (.gz too);
    a line that is not a JSON object stops with an error naming the file and line."""
    with open_text(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{path} line {i + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: not a JSON object")
            yield i, where, record


def unit_hash(key: str) -> float:
    """sha256 of `key`, first 8 bytes as a big-endian integer, scaled to [0, 1)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
