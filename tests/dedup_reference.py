"""The in-memory clustering dedup had before the banded jobs (commit 6a7b90b), kept as the oracle
the banded jobs must match: every signature in one datasketch MinHashLSH, queried doc by doc."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import polars as pl
from datasketch import LeanMinHash, MinHashLSH

from pipeline.data.dedup import SCHEME, example_frame


class UnionFind:
    """Disjoint sets of hashable keys; a set's root is always its smallest key."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, key):
        root = key
        while (up := self.parent.get(root, root)) != root:
            root = up
        while (up := self.parent.get(key, key)) != root:  # path compression
            self.parent[key], key = root, up
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def estimated_jaccard(a, b) -> float:
    return float(np.mean(a == b))


def reference_cluster(table: pl.DataFrame, config: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, Any]]:
    table = table.sort(["id", "source", "row"])
    sigs = table["signature"].to_numpy()
    col = {name: table[name].to_list() for name in ("source", "row", "id", "url", "text_hash", "has_signature")}
    uf = UnionFind()
    first_with_hash: dict[str, int] = {}
    for i, h in enumerate(col["text_hash"]):
        uf.union(first_with_hash.setdefault(h, i), i)
    num_perm = config["bands"] * config["rows"]
    lsh = MinHashLSH(num_perm=num_perm, params=(config["bands"], config["rows"]))
    candidates = [i for i in first_with_hash.values() if col["has_signature"][i]]
    minhash = {i: LeanMinHash(seed=config["seed"], hashvalues=sigs[i], scheme=SCHEME) for i in candidates}
    with lsh.insertion_session() as session:
        for i in candidates:
            session.insert(i, minhash[i])
    pairs_checked = 0
    for i in candidates:
        for j in lsh.query(minhash[i]):
            if j <= i:
                continue
            pairs_checked += 1
            if config["min_jaccard"] is None or estimated_jaccard(sigs[i], sigs[j]) >= config["min_jaccard"]:
                uf.union(i, j)
    roots = [uf.find(i) for i in range(table.height)]
    hashes = col["text_hash"]
    removed = [{
        "source": col["source"][i], "row": col["row"][i], "id": col["id"][i], "url": col["url"][i],
        "duplicate_of": col["id"][r], "duplicate_of_url": col["url"][r],
        "reason": "exact_duplicate" if hashes[i] == hashes[r] else "near_duplicate",
        "similarity": 1.0 if hashes[i] == hashes[r] else estimated_jaccard(sigs[i], sigs[r]),
    } for i, r in enumerate(roots) if i != r]
    removed_frame = pl.DataFrame(removed, schema={
        "source": pl.String, "row": pl.Int64, "id": pl.String, "url": pl.String, "duplicate_of": pl.String,
        "duplicate_of_url": pl.String, "reason": pl.String, "similarity": pl.Float64,
    }).sort(["source", "row"])
    sizes = Counter(Counter(roots).values())
    stats = {
        "docs": table.height,
        "clusters": len(set(roots)),
        "lsh_pairs_checked": pairs_checked,
        "removed": dict(sorted(Counter(r["reason"] for r in removed).items())),
        "cluster_sizes": {str(size): n for size, n in sorted(sizes.items())},
        "example_pairs": example_frame(removed_frame, config["example_pairs"]).to_dicts(),
    }
    return removed_frame, stats
