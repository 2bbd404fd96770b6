"""Documents stream through a stage a batch at a time: the writer's row groups and atomicity, and
stages over shards of many batches giving what they give document by document."""

from __future__ import annotations

import argparse
import importlib
import json

import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_stage_docs, write_wet
from pipeline.config import section_config
from pipeline.data import docs as docs_module
from pipeline.data import langid as langid_module
from pipeline.data.docs import DOC_COLUMNS, LANG_COLUMNS, REMOVED_COLUMNS, DocWriter, read_docs, write_docs
from pipeline.data.ingest import DamagedInput, ingest
from pipeline.data.langid import langid
from pipeline.data.quality import build_filters, judge, quality
from pipeline.data.steps import run_doc_stage


@pytest.fixture
def small_batches(monkeypatch):
    """Batches and row groups of 4 rows, so a test shard of a few dozen documents spans many."""
    monkeypatch.setattr(docs_module, "ROW_GROUP", 4)
    monkeypatch.setattr(langid_module, "BATCH", 3)  # fastText's batches cut across the reader's


def rows(n: int) -> list[dict]:
    return make_docs([f"document {i} " * (i % 7) for i in range(n)])


def test_writer_cuts_row_groups_by_row_count_and_writes_the_same_bytes_twice(tmp_path):
    n = 2 * docs_module.ROW_GROUP + 5
    for name in ("a", "b"):
        assert write_docs(tmp_path / f"{name}.parquet", rows(n), DOC_COLUMNS) == n
    meta = pq.ParquetFile(tmp_path / "a.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [docs_module.ROW_GROUP] * 2 + [5]
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    back = pl.read_parquet(tmp_path / "a.parquet")
    assert back.schema == pl.Schema(DOC_COLUMNS)
    assert back.to_dicts() == [{k: row.get(k) for k in DOC_COLUMNS} for row in rows(n)]  # missing keys: null


def test_writer_with_no_rows_keeps_the_schema(tmp_path):
    assert write_docs(tmp_path / "e.parquet", [], {**DOC_COLUMNS, **LANG_COLUMNS}) == 0
    empty = pl.read_parquet(tmp_path / "e.parquet")
    assert empty.height == 0 and empty.schema == pl.Schema({**DOC_COLUMNS, **LANG_COLUMNS})


def test_an_error_mid_write_leaves_no_file_and_an_old_one_as_it_was(tmp_path, small_batches):
    path = tmp_path / "d.parquet"
    with pytest.raises(RuntimeError, match="boom"):
        with DocWriter(path, DOC_COLUMNS) as out:
            out.write_all(rows(20))  # five row groups already went to the temporary file
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_docs(path, rows(3), DOC_COLUMNS)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with DocWriter(path, DOC_COLUMNS) as out:
            out.write_all(rows(20))
            raise RuntimeError("boom")
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def run_stage(stage, docs_in, out, **kwargs):
    manifest = stage(str(docs_in), output=str(out / "kept.parquet"), removed=str(out / "removed.parquet"),
                     manifest=str(out / "manifest.json"), **kwargs)
    return read_docs(out / "kept.parquet"), read_docs(out / "removed.parquet"), manifest


def mixed_docs(stories: list[str]) -> list[dict]:
    """Stories (kept) between pages each quality group drops, C4-cleaned lines among them."""
    texts = []
    for i, story in enumerate(stories[:30]):
        texts.append(story if i % 3 else "Home\n" + story)  # `Home`: a line C4 removes
        if i % 4 == 0:
            texts.append(["too short", "menu item\n" * 40, story + " lorem ipsum dolor"][i % 3])
    return make_docs(texts, input="wet", extractor="commoncrawl-wet", lang="en", lang_score=0.99)


def test_quality_over_many_batches_is_quality_document_by_document(tmp_path, stories, small_batches):
    docs = mixed_docs(stories)
    docs_in = write_stage_docs(tmp_path / "in" / "s.parquet", docs, {**DOC_COLUMNS, **LANG_COLUMNS})
    kept, removed, manifest = run_stage(quality, docs_in, tmp_path / "out", config={})
    filters = build_filters(section_config("quality", {}))  # the reference: no reader, no writer
    expected = [judge(filters, doc) for doc in docs]
    assert kept == [doc for doc, reason in expected if reason is None]
    assert removed == [{**{k: doc[k] for k in REMOVED_COLUMNS if k != "reason"}, "reason": reason}
                       for doc, reason in expected if reason is not None]
    assert len(kept) > 2 * docs_module.ROW_GROUP and len(removed) > docs_module.ROW_GROUP
    counts = manifest["counts"]
    assert counts["docs_in"] == len(docs) == counts["docs_out"] + sum(counts["dropped"].values())
    c4 = next(f for f in filters if f.name == "c4")
    assert c4.lines_removed and manifest["metrics"]["c4_lines"]["removed_by_rule"] == dict(c4.lines_removed)
    meta = pq.ParquetFile(tmp_path / "out" / "kept.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]  # cut by row count alone
    assert sizes[:-1] == [4] * (len(sizes) - 1) and 0 < sizes[-1] <= 4 and sum(sizes) == len(kept)


def test_langid_over_a_shard_is_langid_over_its_halves_concatenated(tmp_path, stories, small_batches):
    texts = [s if i % 5 else "Ceci est un petit texte en français, pas en anglais." for i, s in enumerate(stories[:25])]
    docs = make_docs(texts, input="wet", extractor="commoncrawl-wet")
    whole = write_stage_docs(tmp_path / "in" / "s.parquet", docs, DOC_COLUMNS)
    halves = [write_stage_docs(tmp_path / "in" / f"h{i}.parquet", part, DOC_COLUMNS)
              for i, part in enumerate([docs[:12], docs[12:]])]
    kept, removed, manifest = run_stage(langid, whole, tmp_path / "whole", config={})
    parts = [run_stage(langid, half, tmp_path / half.stem, config={}) for half in halves]
    assert kept == parts[0][0] + parts[1][0] and removed == parts[0][1] + parts[1][1]
    assert len(removed) == 5 and {d["reason"] for d in removed} == {"language_not_kept"}
    assert manifest["metrics"]["languages_in"] == {"en": 20, "fr": 5}


def test_a_decide_that_skips_a_document_fails_and_writes_nothing(tmp_path, small_batches):
    docs_in = write_stage_docs(tmp_path / "in" / "s.parquet", rows(10), DOC_COLUMNS)

    def decide(docs):
        for doc in list(docs)[:-1]:
            yield doc, None

    out = tmp_path / "out"
    with pytest.raises(AssertionError, match="9 decisions for 10 documents"):
        run_doc_stage("broken", decide, docs_in=docs_in, docs_out=out / "k.parquet", removed_out=out / "r.parquet",
                      manifest=out / "m.json", config={})
    assert not out.exists() or list(out.iterdir()) == []


GOOD = "An ordinary paragraph of English text about gardens and the plants in them.\n".encode()


def test_ingest_streams_many_row_groups_and_counts_record_types(tmp_path, small_batches):
    bodies = [GOOD * (1 + i % 3) if i % 6 else b"  \n" for i in range(30)]  # every sixth: empty
    wet = write_wet(tmp_path / "t.warc.wet.gz", bodies)
    out = tmp_path / "out"
    manifest = ingest(str(wet), output=str(out / "k.parquet"), removed=str(out / "r.parquet"),
                      manifest=str(out / "manifest.json"), config={})
    kept, removed = read_docs(out / "k.parquet"), read_docs(out / "r.parquet")
    assert [d["text"] for d in kept] == [b.decode() for b in bodies if b.strip()]
    assert [d["id"] for d in removed] == [f"<urn:uuid:doc-{i:04d}>" for i in range(0, 30, 6)]
    assert manifest["metrics"]["record_types"] == {"digests_checked": 30, "records_conversion": 30,
                                                   "records_warcinfo": 1}
    assert json.loads((out / "manifest.json").read_text())["outputs"][0]["records"] == len(kept)


def test_ingest_failing_on_a_damaged_file_leaves_no_output(tmp_path, small_batches):
    wet = write_wet(tmp_path / "t.warc.wet.gz", [GOOD] * 20)
    wet.write_bytes(wet.read_bytes()[:-30])  # the last gzip member cut short
    out = tmp_path / "out"
    with pytest.raises(DamagedInput, match="t.warc.wet.gz"):
        ingest(str(wet), output=str(out / "k.parquet"), removed=str(out / "r.parquet"),
               manifest=str(out / "m.json"), config={"fail_on_damaged": True})
    assert not out.exists() or list(out.iterdir()) == []


def test_url_filter_and_extract_give_the_same_rows_in_small_batches(tmp_path, monkeypatch):
    """The bundled WARC's 16 responses, some blocked: row groups of 4 (passed lists read 4 at a
    time) against the default, which holds the whole sample in one."""
    from collections import Counter

    from conftest import SAMPLE_WARC
    from pipeline.data.extract import extract
    from pipeline.data.url_filter import url_filter
    from pipeline.data.warc import response_records

    responses = response_records(str(SAMPLE_WARC), Counter(), [])
    urls = [headers.get_header("WARC-Target-URI") for _, headers, *_ in responses]
    blocked = tmp_path / "blocked.txt"
    blocked.write_text("\n".join(urls[1:12:3]) + "\n")  # 4 of 16, spread over the file
    config = {"lists": [{"name": "test", "kind": "substrings", "path": str(blocked)}]}
    runs = {}
    for name, row_group in (("whole", docs_module.ROW_GROUP), ("small", 4)):
        monkeypatch.setattr(docs_module, "ROW_GROUP", row_group)
        out = tmp_path / name
        passed = out / "url_filter" / "s.parquet"
        url_manifest = url_filter(str(SAMPLE_WARC), output=str(passed), removed=str(out / "rm_url.parquet"),
                                  manifest=str(out / "url_filter" / "s.manifest.json"), config=config,
                                  lists={"test": str(blocked)})
        manifest = extract(str(SAMPLE_WARC), str(passed), output=str(out / "extract.parquet"),
                           removed=str(out / "rm_extract.parquet"), manifest=str(out / "m.json"), config={})
        runs[name] = ([pl.read_parquet(out / f).to_dicts() for f in ("url_filter/s.parquet", "rm_url.parquet",
                                                                      "extract.parquet", "rm_extract.parquet")],
                      url_manifest["counts"], url_manifest["metrics"], manifest["counts"], manifest["metrics"])
    assert runs["small"] == runs["whole"]
    (passed, blocked_rows, kept, _), url_counts, url_metrics, counts, metrics = runs["small"]
    assert url_counts["dropped"] == {"url_blocklist:test": 4} and len(passed) == 12 == counts["docs_in"]
    assert url_metrics["record_types"]["records_response"] == 16  # counted while the records streamed
    assert metrics["records"] and len(kept) == counts["docs_out"] > 4


@pytest.mark.parametrize("stage, kind", [("ingest", "WET"), ("url_filter", "WARC"), ("extract", "WARC")])
def test_an_entry_stage_fails_naming_a_missing_input_file_before_writing(stage, kind, sample_wet, tmp_path):
    """An entry stage given several input files fails on the missing one, by name, and writes nothing."""
    missing = tmp_path / "gone.warc.gz"
    args = argparse.Namespace(input=[str(sample_wet), str(missing)], output=str(tmp_path / "k.parquet"),
                              removed=str(tmp_path / "r.parquet"), manifest=str(tmp_path / "m.json"),
                              config={}, lists={}, passed=str(tmp_path / "p.parquet"))
    with pytest.raises(FileNotFoundError, match=f"{stage}: input {kind} file {missing} does not exist"):
        importlib.import_module(f"pipeline.data.{stage}").run(args)
    assert list(tmp_path.iterdir()) == []
