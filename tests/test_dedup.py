"""dedup: planted exact and near duplicates go, one kept per cluster; shared paragraphs stay; the
banded jobs find exactly what one datasketch MinHashLSH over every signature finds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import make_docs, write_stage_docs
from dedup_reference import UnionFind, reference_cluster
from pipeline.artifacts import read_manifest, write_manifest
from pipeline.config import section_config
from pipeline.data import dedup
from pipeline.data.dedup import (EXACT, bucket_pairs, bucket_tables, cluster, normalize, run_band,
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


def run_steps(root, shards: dict, config: dict, band_order=None, rerun=False):
    """The four steps as the workflow runs them, each shard's documents written by `quality` first."""
    schema = {**DOC_COLUMNS, "lang": pl.String, "lang_score": pl.Float64}
    for name, part in shards.items():
        if not rerun:
            write_stage_docs(root / f"quality/{name}.parquet", part, schema)
        run_signatures(str(root / f"quality/{name}.parquet"), output=str(root / f"sig/{name}.parquet"),
                       buckets=str(root / f"buckets/{name}.parquet"),
                       manifest=str(root / f"sig/{name}.manifest.json"), config=dict(config, batch_size=5))
    bands = band_order or [*map(str, range(CONFIG["bands"])), EXACT]
    for band in bands:
        run_band([str(root / f"buckets/{n}.parquet") for n in shards], band,
                 upstream=[str(root / f"sig/{n}.manifest.json") for n in shards],
                 output=str(root / f"pairs/{band}.parquet"), manifest=str(root / f"pairs/{band}.manifest.json"),
                 config=config)
    run_clusters([str(root / f"sig/{n}.parquet") for n in shards], [str(root / f"pairs/{b}.parquet") for b in bands],
                 output=str(root / "clusters"), manifest=str(root / "manifest.json"), config=config)
    for n in shards:
        run_filter(str(root / f"quality/{n}.parquet"), str(root / f"clusters/{n}.parquet"),
                   output=str(root / f"clean/{n}.parquet"), removed=str(root / f"removed/{n}.parquet"),
                   manifest=str(root / f"clean/{n}.manifest.json"), config=config)


def test_four_steps_across_two_shards_are_deterministic(tmp_path, stories, monkeypatch):
    monkeypatch.setattr(dedup, "BUCKET_ROW_GROUP", 4)  # several row groups per band
    docs = make_docs(planted(stories), lang="en", lang_score=0.9)
    shards = {"a": docs[:12], "b": docs[12:]}
    run_steps(tmp_path / "one", shards, {})
    # a memory budget of a few rows: bands and joins split into parts through temporary files
    run_steps(tmp_path / "two", shards, {"memory_mb": 1e-4}, band_order=[EXACT, *map(str, range(13, -1, -1))])
    removed = pl.concat([pl.read_parquet(tmp_path / f"one/removed/{n}.parquet") for n in shards])
    assert sorted(removed["reason"]) == ["exact_duplicate", "near_duplicate"]
    assert removed["duplicate_of"].to_list() == [docs[0]["id"], docs[1]["id"]]
    clean = sum(pl.read_parquet(tmp_path / f"one/clean/{n}.parquet").height for n in shards)
    assert clean == len(docs) - 2
    for rel in ["clusters/a.parquet", "clusters/b.parquet", "clean/a.parquet", "clean/b.parquet", "removed/b.parquet",
                "sig/a.parquet", "buckets/b.parquet", "pairs/0.parquet", "pairs/exact.parquet"]:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    assert not list((tmp_path / "two").rglob("*.tmp*"))  # no temporary file left behind
    # each shard's file holds its own duplicates only, the two of them the whole result
    assert set(pl.read_parquet(tmp_path / "one/clusters/b.parquet")["source"]) == {"b"}
    # batches of 5 documents give the bytes one batch gives; the banded jobs equal one in-memory LSH
    whole = pl.concat([signatures(part, name, CONFIG) for name, part in shards.items()])
    assert pl.read_parquet(tmp_path / "one/sig/a.parquet").equals(whole.filter(pl.col("source") == "a"))
    expected, stats = reference_cluster(whole, CONFIG)
    assert pl.read_parquet(tmp_path / "one/clusters/*.parquet").equals(expected)
    assert read_manifest(tmp_path / "one/manifest.json")["metrics"] == stats


def test_rerun_after_a_kill_gives_the_same_bytes(tmp_path, stories):
    """What a killed clusters job leaves (its temporary folder, some shards' files, a half-written
    temporary file) does not change the rerun's bytes."""
    docs = make_docs(planted(stories), lang="en", lang_score=0.9)
    shards = {"a": docs[:12], "b": docs[12:]}
    config = {"memory_mb": 1e-4}
    run_steps(tmp_path / "clean", shards, config)
    root = tmp_path / "killed"
    run_steps(root, shards, config)
    (root / "manifest.json").unlink()
    (root / "clusters/b.parquet").unlink()
    (root / ".clusters.tmp").mkdir()
    (root / ".clusters.tmp/0.arrow").write_bytes(b"half a part")
    (root / "clusters/.b.parquet.tmp-999999").write_bytes(b"half a file")
    run_steps(root, shards, config, rerun=True)
    for path in (tmp_path / "clean").rglob("*.parquet"):
        assert path.read_bytes() == (root / path.relative_to(tmp_path / "clean")).read_bytes(), path
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert not list(root.rglob("*.tmp*"))


def test_a_truncated_or_corrupt_input_stops_the_job_naming_it(tmp_path, stories):
    docs = make_docs(planted(stories), lang="en", lang_score=0.9)
    shards = {"a": docs[:12], "b": docs[12:]}
    run_steps(tmp_path, shards, {})
    sigs = [str(tmp_path / f"sig/{n}.parquet") for n in shards]
    pairs = [str(tmp_path / f"pairs/{b}.parquet") for b in [*map(str, range(CONFIG["bands"])), EXACT]]
    out = {"output": str(tmp_path / "again"), "manifest": str(tmp_path / "again.json"), "config": {}}
    for victim in (pairs[3], sigs[1]):  # truncated: its sha256 no longer matches its manifest
        data = Path(victim).read_bytes()
        Path(victim).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=re.escape(victim)):
            run_clusters(sigs, pairs, **out)
        Path(victim).write_bytes(data)
    # a pair file its manifest vouches for, naming a row no signature file holds
    bad = tmp_path / "pairs/bad.parquet"
    dedup.write_pairs(str(bad), [(np.array([5], np.uint64), np.array([(1 << 32) + 999], np.uint64))],
                      {"band": "0", "shards": 2, "shards_sha256": dedup.shards_digest(["a", "b"])})
    write_manifest(tmp_path / "pairs/bad.manifest.json", stage="dedup_band", config={}, inputs=[],
                   outputs={bad: 1})
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: pair names shard 1 row 999"):
        run_clusters(sigs, [*pairs, str(bad)], **out)
    # pairs numbered over other shards than the signature files given
    with pytest.raises(ValueError, match=f"{re.escape(pairs[0])}: pairs numbered over other shards"):
        run_clusters(sigs[:1], pairs, **out)
    # a band job given a bucket index cut short
    buckets = [str(tmp_path / f"buckets/{n}.parquet") for n in shards]
    Path(buckets[0]).write_bytes(Path(buckets[0]).read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(buckets[0])):
        run_band(buckets, "0", upstream=[str(tmp_path / f"sig/{n}.manifest.json") for n in shards],
                 output=str(tmp_path / "p.parquet"), manifest=str(tmp_path / "p.json"), config={})


def test_filter_reads_its_own_shards_clusters_only(tmp_path, stories):
    docs = make_docs(planted(stories), lang="en", lang_score=0.9)
    run_steps(tmp_path, {"a": docs[:12], "b": docs[12:]}, {})
    with pytest.raises(ValueError, match="is not the clusters file of"):
        run_filter(str(tmp_path / "quality/a.parquet"), str(tmp_path / "clusters/b.parquet"),
                   output=str(tmp_path / "x.parquet"), removed=str(tmp_path / "y.parquet"),
                   manifest=str(tmp_path / "z.json"), config={})


def test_shards_with_no_documents_cluster_to_nothing(stories):
    empty = signatures([], "a", CONFIG)
    removed, stats = cluster(pl.concat([empty, signatures(make_docs(stories[:3]), "b", CONFIG)]), CONFIG)
    assert removed.height == 0 and stats["clusters"] == 3
    removed, stats = cluster(empty, CONFIG)
    assert removed.height == 0 and stats["docs"] == 0


def test_a_shard_with_no_documents_passes_through_every_step(tmp_path, stories):
    docs = make_docs(planted(stories), lang="en", lang_score=0.9)
    run_steps(tmp_path, {"a": [], "b": docs, "c": [{**d, "text": ""} for d in docs[:3]]}, {"memory_mb": 1e-4})
    assert pl.read_parquet(tmp_path / "clusters/a.parquet").height == 0
    assert pl.read_parquet(tmp_path / "removed/b.parquet").height == 2
    # c: three documents with no words, exact duplicates of each other
    assert pl.read_parquet(tmp_path / "removed/c.parquet")["reason"].to_list() == ["exact_duplicate"] * 2


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
    assert removed.equals(expected)
    assert stats["removed"].keys() == {"exact_duplicate", "near_duplicate"}
    checked, expected_checked = stats.pop("lsh_pairs_checked"), expected_stats.pop("lsh_pairs_checked")
    assert stats == expected_stats
    if min_jaccard is None:  # each document paired with its bucket's first only: fewer pairs checked
        assert 0 < checked < expected_checked
    else:
        assert checked == expected_checked > 0


@pytest.mark.parametrize("min_jaccard", [0.7, 0.3])
def test_band_keys_shared_by_chance_are_dropped(monkeypatch, min_jaccard):
    """Band keys of 2 bits: most documents in a bucket have other band values. Their pairs are
    dropped by comparing the values, and the result is still one datasketch MinHashLSH's."""
    band_keys = dedup.band_keys
    monkeypatch.setattr(dedup, "band_keys", lambda values, rows: band_keys(values, rows) % np.uint64(4))
    config = dict(CONFIG, min_jaccard=min_jaccard, bands=6, rows=2)
    table = synthetic_signatures(300, 4, config)
    removed, stats = cluster(table, config)
    expected, expected_stats = reference_cluster(table, config)
    assert removed.equals(expected) and stats == expected_stats


@pytest.mark.parametrize("min_jaccard", [0.7, None])
def test_removed_set_does_not_depend_on_the_shard_count(min_jaccard):
    """The same documents in 1, 3 and 7 shards, named out of document order: the same documents
    go, each with the same representative (the first of its cluster by id)."""
    config = dict(CONFIG, min_jaccard=min_jaccard, bands=6, rows=2)
    table = synthetic_signatures(600, 3, config).drop("source", "row")
    results = []
    for shards in (1, 3, 7):
        names = [f"{name:03d}" for name in np.random.default_rng(shards).permutation(shards)]
        place = np.arange(table.height) * shards // table.height
        split = table.with_columns(source=pl.Series([names[p] for p in place]),
                                   row=pl.Series(np.arange(table.height) - np.searchsorted(place, place)))
        removed, stats = cluster(split, config)
        results.append((sorted(zip(removed["id"], removed["duplicate_of"], removed["reason"])), stats["removed"]))
    assert results[0][1]["near_duplicate"] > 0 and results[0] == results[1] == results[2]


def test_a_bucket_of_10000_near_copies_makes_linear_pairs(tmp_path):
    """With min_jaccard null each document pairs with its bucket's first: 9,999 pairs for 10,000
    near copies (not 49,995,000), and the clusters are those every pair gives."""
    config = dict(CONFIG, min_jaccard=None, bands=6, rows=2)
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**32, size=(10_000, 12), dtype=np.uint32)
    values[:, :2] = 7  # every document shares band 0, and only band 0
    table = pl.DataFrame({
        "source": "s", "row": np.arange(10_000), "id": [f"<urn:uuid:{i:05d}>" for i in rng.permutation(10_000)],
        "url": [f"http://x/{i}" for i in range(10_000)], "text_hash": [text_hash(str(i)) for i in range(10_000)],
        "has_signature": True, "signature": pl.Series(values, dtype=pl.Array(pl.UInt32, 12)),
    })
    frame = pl.DataFrame({"hash": dedup.band_keys(values, 2)[:, 0], "id": table["id"], "row": table["row"],
                          "text_hash": table["text_hash"], "shard": pl.Series(np.zeros(10_000), dtype=pl.UInt32)})
    a, b = bucket_pairs(dedup.shared_buckets(frame), exact=False, linear=True)
    assert len(a) == 9_999 and len(set(a.tolist())) == 1
    removed, stats = cluster(table, config)
    assert stats["cluster_sizes"] == {"10000": 1} and removed.height == 9_999
    assert set(removed["duplicate_of"]) == {"<urn:uuid:00000>"}
    # the same clusters as every pair of a bucket (min_jaccard 0 joins every checked pair), on 300
    small = table.filter(pl.col("row") < 300)
    linear, _ = cluster(small, config)
    every, every_stats = cluster(small, dict(config, min_jaccard=0.0))
    assert every_stats["lsh_pairs_checked"] == 300 * 299 // 2 and linear.equals(every)


def test_union_joins_as_one_pair_at_a_time():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2000, 1500), rng.integers(0, 2000, 1500)
    parent = np.arange(2000, dtype=np.int32)
    dedup.union(parent, a[:700], b[:700])
    dedup.union(parent, a[700:], b[700:])
    reference = UnionFind()
    for i, j in zip(a.tolist(), b.tolist()):
        reference.union(i, j)
    assert dedup.find(parent, np.arange(2000)).tolist() == [reference.find(i) for i in range(2000)]


def test_band_parts_give_the_pairs_of_one_sorted_band(tmp_path):
    """A band split by key range into parts (memory_mb of a few rows) gives the pairs of the whole
    band sorted at once, byte for byte."""
    config = dict(CONFIG, bands=6, rows=2)
    table = synthetic_signatures(300, 2, config)
    for name in ("s0", "s1", "s2"):
        part = table.filter(pl.col("source") == name)
        write_frame_and_buckets(tmp_path, name, part, config)
    buckets = [str(tmp_path / f"buckets/{n}.parquet") for n in ("s0", "s1", "s2")]
    upstream = [str(tmp_path / f"sig/{n}.manifest.json") for n in ("s0", "s1", "s2")]
    for band in ("0", "5", EXACT):
        for memory in (None, 1e-4):
            run_band(buckets, band, upstream=upstream, output=str(tmp_path / f"pairs/{band}-{memory}.parquet"),
                     manifest=str(tmp_path / f"pairs/{band}-{memory}.json"),
                     config=dict(config, **({"memory_mb": memory} if memory else {})))
        whole = (tmp_path / f"pairs/{band}-None.parquet").read_bytes()
        assert pl.read_parquet(tmp_path / f"pairs/{band}-None.parquet").height > 0
        assert whole == (tmp_path / f"pairs/{band}-0.0001.parquet").read_bytes()


def test_pair_bytes_do_not_depend_on_how_the_pairs_came(tmp_path):
    """300,000 distinct keys overflow parquet's dictionary page, whose fallback is decided per
    chunk written: pairs given whole or in 97 pieces must still give the same file."""
    keys = np.random.default_rng(0).permutation(600_000).astype(np.uint64)
    a, b = keys[:300_000], keys[300_000:]
    meta = {"band": "0", "shards": 1, "shards_sha256": ""}
    dedup.write_pairs(str(tmp_path / "whole.parquet"), [(a, b)], meta)
    cuts = np.linspace(0, len(a), 98).astype(int)
    dedup.write_pairs(str(tmp_path / "pieces.parquet"), [(a[i:j], b[i:j]) for i, j in zip(cuts, cuts[1:])], meta)
    assert (tmp_path / "whole.parquet").read_bytes() == (tmp_path / "pieces.parquet").read_bytes()


def write_frame_and_buckets(root, name, table, config):
    sig, buckets = root / f"sig/{name}.parquet", root / f"buckets/{name}.parquet"
    dedup.write_frame(str(sig), table)
    dedup.write_buckets(str(buckets), bucket_tables(table, config))
    write_manifest(root / f"sig/{name}.manifest.json", stage="dedup_signatures", config=config, inputs=[],
                   outputs={sig: table.height, buckets: None})


def test_band_names_a_bad_band(tmp_path):
    with pytest.raises(ValueError, match="--band '14' is not `exact` or a band 0..13"):
        run_band([], "14", upstream=[], output=str(tmp_path / "p.parquet"), manifest=str(tmp_path / "m.json"),
                 config={})
