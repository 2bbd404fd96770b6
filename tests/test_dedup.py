"""dedup: planted exact and near duplicates go, one kept per cluster; shared paragraphs stay; the
banded jobs find exactly what one datasketch MinHashLSH over every signature finds."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from conftest import make_docs, write_stage_docs
from dedup_reference import reference_cluster
from pipeline.artifacts import read_manifest
from pipeline.config import section_config
from pipeline.data import dedup
from pipeline.data.dedup import (EXACT, bucket_pairs, bucket_tables, cluster, merge_buckets, normalize, run_band,
                                 run_clusters, run_filter, run_signatures, shingles, signatures, text_hash)
from pipeline.data.docs import DOC_COLUMNS

CONFIG = section_config("dedup", {})


def planted(stories):
    """Distinct stories, plus: an exact duplicate up to case, punctuation and whitespace; a near
    duplicate (three words changed); and two documents that share only one paragraph."""
    base = stories[:20]
    words = stories[0].split()
    near = " ".join(w if i not in (40, 80, 120) else "banana" for i, w in enumerate(words))
    exact = "  " + stories[1].upper().replace(".", " !") + "\n\n"
    shared_a = stories[20] + "\n\n" + stories[22][:300]
    shared_b = stories[21] + "\n\n" + stories[22][:300]
    return base + [near, exact, shared_a, shared_b]


def test_normalize_folds_case_accents_punctuation_digits():
    assert normalize("  Café, CAFÉ!  Room 101\n") == "cafe cafe room 000"
    assert shingles("a b c", 5) == {b"a b c"} and shingles("", 5) == set()
    assert len(shingles("a b c d e f", 5)) == 2


def test_planted_duplicates_removed_one_kept_per_cluster(stories):
    docs = make_docs(planted(stories))
    removed, stats = cluster(signatures(docs, "s", CONFIG), CONFIG)
    by_id = {r["id"]: r for r in removed.to_dicts()}
    assert set(by_id) == {docs[20]["id"], docs[21]["id"]}  # ids sort after their originals
    assert by_id[docs[20]["id"]]["reason"] == "near_duplicate"
    assert by_id[docs[20]["id"]]["duplicate_of"] == docs[0]["id"]
    assert 0.7 <= by_id[docs[20]["id"]]["similarity"] < 1
    assert by_id[docs[21]["id"]]["reason"] == "exact_duplicate"
    assert by_id[docs[21]["id"]]["similarity"] == 1.0 and by_id[docs[21]["id"]]["duplicate_of"] == docs[1]["id"]
    assert stats["cluster_sizes"] == {"1": len(docs) - 4, "2": 2}


def test_representative_does_not_depend_on_shard_split_or_order(stories):
    docs = make_docs(planted(stories))
    whole, _ = cluster(signatures(docs, "s", CONFIG), CONFIG)
    reversed_shards = pl.concat([signatures(docs[12:][::-1], "b", CONFIG), signatures(docs[:12], "a", CONFIG)])
    split, _ = cluster(reversed_shards, CONFIG)
    pairs = lambda frame: sorted(zip(frame["id"], frame["duplicate_of"], frame["reason"]))  # noqa: E731
    assert pairs(whole) == pairs(split)


def test_min_jaccard_null_accepts_every_bucket_collision(stories):
    docs = make_docs(planted(stories))
    strict = dict(CONFIG, min_jaccard=0.99)
    removed, _ = cluster(signatures(docs, "s", strict), strict)
    assert removed["reason"].to_list() == ["exact_duplicate"]  # the near duplicate is under 0.99
    loose = dict(CONFIG, min_jaccard=None)
    removed, _ = cluster(signatures(docs, "s", loose), loose)
    assert sorted(removed["reason"]) == ["exact_duplicate", "near_duplicate"]


def test_three_steps_across_two_shards_are_deterministic(tmp_path, stories, monkeypatch):
    monkeypatch.setattr(dedup, "BUCKET_ROW_GROUP", 4)  # several row groups per band, read as one stream
    docs = make_docs(planted(stories), lang="en", lang_score=0.9)
    shards = {"a": docs[:12], "b": docs[12:]}
    schema = {**DOC_COLUMNS, "lang": pl.String, "lang_score": pl.Float64}

    def run_all(root):
        for name, part in shards.items():
            write_stage_docs(root / f"quality/{name}.parquet", part, schema)
            run_signatures(str(root / f"quality/{name}.parquet"), output=str(root / f"sig/{name}.parquet"),
                           buckets=str(root / f"buckets/{name}.parquet"),
                           manifest=str(root / f"sig/{name}.manifest.json"), config={"batch_size": 5})
        bands = [*map(str, range(CONFIG["bands"])), EXACT]
        for band in bands:
            run_band([str(root / f"buckets/{n}.parquet") for n in shards], band,
                     upstream=[str(root / f"sig/{n}.manifest.json") for n in shards],
                     output=str(root / f"pairs/{band}.parquet"), manifest=str(root / f"pairs/{band}.manifest.json"),
                     config={"merge_batch": 3})
        run_clusters([str(root / f"sig/{n}.parquet") for n in shards], [str(root / f"pairs/{b}.parquet") for b in bands],
                     output=str(root / "clusters.parquet"), manifest=str(root / "manifest.json"), config={})
        return [run_filter(str(root / f"quality/{n}.parquet"), str(root / "clusters.parquet"),
                           output=str(root / f"clean/{n}.parquet"), removed=str(root / f"removed/{n}.parquet"),
                           manifest=str(root / f"clean/{n}.manifest.json"), config={}) for n in shards]

    run_all(tmp_path / "one")
    run_all(tmp_path / "two")
    removed = pl.concat([pl.read_parquet(tmp_path / f"one/removed/{n}.parquet") for n in shards])
    assert sorted(removed["reason"]) == ["exact_duplicate", "near_duplicate"]
    assert removed["duplicate_of"].to_list() == [docs[0]["id"], docs[1]["id"]]
    clean = sum(pl.read_parquet(tmp_path / f"one/clean/{n}.parquet").height for n in shards)
    assert clean == len(docs) - 2
    for rel in ["clusters.parquet", "clean/a.parquet", "clean/b.parquet", "removed/b.parquet", "sig/a.parquet",
                "buckets/b.parquet", "pairs/0.parquet", "pairs/exact.parquet"]:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    # batches of 5 documents give the bytes one batch gives; the banded jobs equal one in-memory LSH
    whole = pl.concat([signatures(part, name, CONFIG) for name, part in shards.items()])
    assert pl.read_parquet(tmp_path / "one/sig/a.parquet").equals(whole.filter(pl.col("source") == "a"))
    expected, stats = reference_cluster(whole, CONFIG)
    assert pl.read_parquet(tmp_path / "one/clusters.parquet").equals(expected)
    assert read_manifest(tmp_path / "one/manifest.json")["metrics"] == stats


def test_shards_with_no_documents_cluster_to_nothing(stories):
    empty = signatures([], "a", CONFIG)
    removed, stats = cluster(pl.concat([empty, signatures(make_docs(stories[:3]), "b", CONFIG)]), CONFIG)
    assert removed.height == 0 and stats["clusters"] == 3
    removed, stats = cluster(empty, CONFIG)
    assert removed.height == 0 and stats["docs"] == 0


def synthetic_signatures(n: int, seed: int, config: dict) -> pl.DataFrame:
    """Random signatures with planted near duplicates (a few band-sized blocks copied, so some
    pairs share a bucket but fall under min_jaccard), exact copies and empty documents."""
    rng = np.random.default_rng(seed)
    perm = config["bands"] * config["rows"]
    values = rng.integers(0, 50, size=(n, perm), dtype=np.uint32)  # small alphabet: chance bucket hits too
    texts = [text_hash(str(i)) for i in range(n)]
    for i in range(1, n):
        j = int(rng.integers(0, i))
        kind = rng.random()
        if kind < 0.15:  # exact copy
            values[i], texts[i] = values[j], texts[j]
        elif kind < 0.45:  # near copy: some permutations redrawn
            keep = rng.random(perm) < rng.uniform(0.5, 0.95)
            values[i] = np.where(keep, values[j], values[i])
    has = rng.random(n) > 0.03
    ids = [f"<urn:uuid:{rng.integers(0, 10**6):06d}>" for _ in range(n)]  # some ids repeat
    return pl.DataFrame({
        "source": pl.Series([f"s{i % 3}" for i in range(n)], dtype=pl.String),
        "row": np.arange(n, dtype=np.int64) // 3,
        "id": ids, "url": [f"http://x/{i}" for i in range(n)],
        "text_hash": [t if h else "e" * 32 for t, h in zip(texts, has)],
        "has_signature": has,
        "signature": pl.Series(np.where(has[:, None], values, 0), dtype=pl.Array(pl.UInt32, perm)),
    })


@pytest.mark.parametrize("min_jaccard", [0.7, 0.3, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_banded_clustering_equals_one_datasketch_lsh(seed, min_jaccard):
    config = dict(CONFIG, min_jaccard=min_jaccard, bands=6, rows=2)
    table = synthetic_signatures(600, seed, config)
    removed, stats = cluster(table, config)
    expected, expected_stats = reference_cluster(table, config)
    assert removed.equals(expected) and stats == expected_stats
    assert stats["lsh_pairs_checked"] > 0 and set(stats["removed"]) == {"exact_duplicate", "near_duplicate"}


def test_merged_streams_give_whole_buckets_and_the_same_pairs():
    """Shards read a few rows at a time and merged give exactly the pairs of one sorted table."""
    config = dict(CONFIG, bands=6, rows=2)
    table = synthetic_signatures(300, 2, config)
    whole = bucket_tables(table, config)
    shards = [bucket_tables(table.filter(pl.col("source") == s), config) for s in ("s0", "s1", "s2")]
    for band in (0, 5, 6):  # 6: exact
        streams = [iter([frame[band][i:i + 4] for i in range(0, frame[band].height, 4)]) for frame in shards]
        chunks = list(merge_buckets(streams))
        assert sum(c.height for c in chunks) == whole[band].height and len(chunks) > 3
        keys = [set(c["hash"]) for c in chunks]
        assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1:])  # no bucket split
        merged = bucket_pairs(chunks, band, exact=band == 6).sort(pl.all())
        assert merged.height > 0 and merged.equals(bucket_pairs([whole[band]], band, exact=band == 6).sort(pl.all()))


def test_band_names_a_bad_band(tmp_path):
    with pytest.raises(ValueError, match="--band '14' is not `exact` or a band 0..13"):
        run_band([], "14", upstream=[], output=str(tmp_path / "p.parquet"), manifest=str(tmp_path / "m.json"),
                 config={})
