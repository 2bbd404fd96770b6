"""dedup: planted exact and near duplicates go, one kept per cluster; shared paragraphs stay."""

from __future__ import annotations

import polars as pl

from conftest import make_docs, write_stage_docs
from pipeline.config import section_config
from pipeline.data.dedup import cluster, normalize, run_clusters, run_filter, run_signatures, shingles, signatures
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


def test_three_steps_across_two_shards_are_deterministic(tmp_path, stories):
    docs = make_docs(planted(stories), lang="en", lang_score=0.9)
    shards = {"a": docs[:12], "b": docs[12:]}
    schema = {**DOC_COLUMNS, "lang": pl.String, "lang_score": pl.Float64}

    def run_all(root):
        for name, part in shards.items():
            write_stage_docs(root / f"quality/{name}.parquet", part, schema)
            run_signatures(str(root / f"quality/{name}.parquet"), output=str(root / f"sig/{name}.parquet"),
                           manifest=str(root / f"sig/{name}.manifest.json"), config={})
        run_clusters([str(root / f"sig/{n}.parquet") for n in shards], output=str(root / "clusters.parquet"),
                     manifest=str(root / "manifest.json"), config={})
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
    for rel in ["clusters.parquet", "clean/a.parquet", "clean/b.parquet", "removed/b.parquet", "sig/a.parquet"]:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_shards_with_no_documents_cluster_to_nothing(stories):
    empty = signatures([], "a", CONFIG)
    removed, stats = cluster(pl.concat([empty, signatures(make_docs(stories[:3]), "b", CONFIG)]), CONFIG)
    assert removed.height == 0 and stats["clusters"] == 3
    removed, stats = cluster(empty, CONFIG)
    assert removed.height == 0 and stats["docs"] == 0
