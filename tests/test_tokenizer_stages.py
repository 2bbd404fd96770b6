"""The tokenizer and tokenize stages: sources, split and weights, shards and their index
arithmetic, the tokens manifest, determinism, and bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import RESOURCES, write_stage_docs
from pipeline.__main__ import main
from pipeline.artifacts import verify
from pipeline.config import ConfigError, section_config
from pipeline.data.docs import DOC_COLUMNS, LANG_COLUMNS
from pipeline.records import unit_hash
from pipeline.token_shards import read_shard, write_shard
from pipeline.tokenizer import BPETokenizer
from pipeline.tokenizer.bpe import CHAT_SPECIAL_TOKENS
from pipeline.tokenizer.sources import Source, copies, is_val, read_documents, smallest_until, text_sources
from pipeline.tokenizer.tokenize import split_texts
from pipeline.tokenizer.stage import keyed_train_documents

TINYSTORIES = RESOURCES / "tinystories" / "TinyStories-valid.head1.5M.txt.gz"
GPT2 = [str(RESOURCES / "gpt2" / "encoder.json"), str(RESOURCES / "gpt2" / "vocab.bpe")]
CONFIG = {"vocab_size": 320, "val_fraction": 0.2}


def stories(n: int) -> list[str]:
    text = gzip.open(TINYSTORIES, "rt", encoding="utf-8").read(2000 * n)
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:n]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Source]:
    """Three small sources: a clean web shard (parquet), a .gz text corpus with an empty document,
    and a jsonl corpus of weight 2."""
    folder = tmp_path_factory.mktemp("inputs")
    texts = stories(60)
    web = [{"id": f"<urn:uuid:{i}>", "url": f"https://example.com/{i}", "date": "2020-11-29", "source": "web",
            "text": text + " Visit 中文 😀!", "lang": "en", "lang_score": 0.9} for i, text in enumerate(texts[:30])]
    write_stage_docs(folder / "web.parquet", web, {**DOC_COLUMNS, **LANG_COLUMNS})
    with gzip.open(folder / "stories.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n<|endoftext|>\n".join(texts[30:50] + ["   "]) + "\n")  # the last document is empty
    with open(folder / "chat.jsonl", "w", encoding="utf-8") as f:
        for text in texts[50:]:
            f.write(json.dumps({"content": text}) + "\n")
    return {"web": Source("web", str(folder / "web.parquet")),
            "stories": Source("stories", str(folder / "stories.txt.gz"), format="text"),
            "chat": Source("chat", str(folder / "chat.jsonl"), format="jsonl", field="content", weight=2.0)}


def run_stages(inputs: dict[str, Source], out: Path, config: dict = CONFIG) -> Path:
    """The three commands as the rules call them; returns the results folder."""
    tok = out / "tokenizer"
    clean = [s.path for s in inputs.values() if s.format == "parquet"]
    text = json.dumps([vars(s) for s in inputs.values() if s.format != "parquet"])
    assert main(["tokenizer", "--clean", *clean, "--text", text, "--gpt2", *GPT2, "--tokenizer", str(tok / "tokenizer.json"),
                 "--compression", str(tok / "compression.json"), "--report", str(tok / "compression.md"),
                 "--manifest", str(tok / "manifest.json"), "--config", json.dumps(config)]) == 0
    for name, source in inputs.items():
        assert main(["tokenize", "--source", source.to_json(), "--tokenizer", str(tok / "tokenizer.json"),
                     "--train", str(out / f"tokens/train/{name}.bin"), "--val", str(out / f"tokens/val/{name}.bin"),
                     "--manifest", str(out / f"tokens/{name}.manifest.json"), "--config", json.dumps(config)]) == 0
    assert main(["tokens", "--tokenizer", str(tok / "tokenizer.json"), "--output", str(out / "tokens/manifest.json"),
                 *[str(out / f"tokens/{name}.manifest.json") for name in inputs]]) == 0
    return out


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory) -> Path:
    return run_stages(inputs, tmp_path_factory.mktemp("run"))


# --- sources ---------------------------------------------------------------------------------------

def test_text_corpus_splits_on_separator_lines(inputs):
    dropped = Counter()
    docs = list(read_documents(inputs["stories"], dropped))
    assert len(docs) == 20 and dropped == {"empty": 1}
    assert [doc_id for doc_id, _ in docs[:2]] == ["stories:0", "stories:1"]
    assert docs[0][1] == stories(60)[30]  # stripped, separator lines gone


def test_jsonl_reads_the_field_and_names_a_bad_line(inputs, tmp_path):
    docs = list(read_documents(inputs["chat"]))
    assert docs[0] == ("chat:0", stories(60)[50])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "fine"}\n\n{"text": "no content field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl line 3: no string field 'content'"):
        list(read_documents(Source("bad", str(bad), format="jsonl", field="content")))
    bad.write_text('{"content": "fine"}\n{broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not JSON"):
        list(read_documents(Source("bad", str(bad), format="jsonl", field="content")))


def test_a_parquet_without_text_names_the_file(tmp_path):
    write_stage_docs(tmp_path / "x.parquet", [{"id": "a", "reason": "empty"}], {"id": DOC_COLUMNS["id"], "reason": DOC_COLUMNS["id"]})
    with pytest.raises(ValueError, match=r"x.parquet: not a document parquet"):
        list(read_documents(Source("x", str(tmp_path / "x.parquet"))))


def test_text_sources_config_errors_name_the_key(tmp_path):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    assert text_sources([{"name": "a", "path": "a.txt"}], base=tmp_path)["a"].format == "text"
    with pytest.raises(ConfigError, match=r"inputs.text\[0\].path"):
        text_sources([{"name": "a", "path": "missing.txt"}], base=tmp_path)
    with pytest.raises(ConfigError, match=r"inputs.text\[1\].name"):
        text_sources([{"name": "a", "path": "a.txt"}, {"name": "a", "path": "a.txt"}], base=tmp_path)
    with pytest.raises(ConfigError, match=r"inputs.text\[0\].name"):
        text_sources([{"name": "web", "path": "a.txt"}], base=tmp_path, taken=["web"])


def test_tokenizer_config_is_validated():
    assert section_config("tokenizer", {})["vocab_size"] == 4096
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        section_config("tokenizer", {"vocab_size": 100})
    with pytest.raises(ConfigError, match="tokenizer.pattern"):
        section_config("tokenizer", {"pattern": "gpt3"})
    assert section_config("tokenizer", {})["special_tokens"] == list(CHAT_SPECIAL_TOKENS)
    with pytest.raises(ConfigError, match="tokenizer.special_tokens"):  # <|endoftext|> is required
        section_config("tokenizer", {"special_tokens": ["<|user_start|>", "<|user_end|>"]})
    with pytest.raises(ConfigError, match="tokenizer.special_tokens"):
        section_config("tokenizer", {"special_tokens": ["<|endoftext|>", "<|endoftext|>"]})


# --- split, weights, sample ------------------------------------------------------------------------

def test_split_and_weights_are_hashes_of_the_id():
    ids = [f"<urn:uuid:{i}>" for i in range(4000)]
    val = [i for i in ids if is_val(i, 0.05)]
    assert 140 < len(val) < 260 and val == [i for i in ids if is_val(i, 0.05)]
    assert all(copies(i, 1.0) == 1 for i in ids)
    assert {copies(i, 2.5) for i in ids} == {2, 3} and 2.4 < sum(copies(i, 2.5) for i in ids) / 4000 < 2.6
    assert 0.45 < sum(copies(i, 0.5) for i in ids) / 4000 < 0.55
    assert unit_hash("x") == int.from_bytes(hashlib.sha256(b"x").digest()[:8], "big") / 2**64


def test_split_is_stable_when_a_shard_changes(tmp_path):
    """The same documents land in the same split whatever else the shard holds, and in any order."""
    docs = [{"id": f"d{i}", "text": f"document {i}"} for i in range(200)]
    write_stage_docs(tmp_path / "a.parquet", docs, DOC_COLUMNS)
    write_stage_docs(tmp_path / "b.parquet", docs[::-3] + [{"id": "new", "text": "new document"}], DOC_COLUMNS)
    val_a = set(split_texts(Source("a", str(tmp_path / "a.parquet")), "val", 0.2))
    val_b = set(split_texts(Source("b", str(tmp_path / "b.parquet")), "val", 0.2))
    assert val_a and val_b - {"new document"} == val_a & {d["text"] for d in docs[::-3]}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.text(min_size=1, max_size=5)), max_size=30),
       st.integers(1, 40))
def test_smallest_until_takes_the_sorted_prefix(items, max_bytes):
    expected, total = [], 0
    for _, text in sorted(items, key=lambda item: item[0]):  # stable: equal keys keep their order
        if total >= max_bytes:
            break
        expected.append(text)
        total += len(text.encode("utf-8"))
    assert smallest_until(iter(items), max_bytes) == expected


def test_training_sample_is_seeded_and_leaves_val_out(inputs):
    sources = list(inputs.values())

    def sample(seed, max_bytes):
        config = section_config("tokenizer", {**CONFIG, "seed": seed, "max_sample_bytes": max_bytes})
        heldout, counts = {}, {}
        return smallest_until(keyed_train_documents(sources, config, heldout, counts), max_bytes), heldout, counts

    everything, heldout, counts = sample(0, 10**9)
    assert counts["chat"]["train_copies"] == 2 * counts["chat"]["train_documents"]  # weight 2
    assert len(everything) == sum(c["train_copies"] for c in counts.values())
    assert not set(everything) & {t for texts in heldout.values() for t in texts}
    small = sample(0, 5000)[0]
    assert sum(len(t.encode()) for t in small[:-1]) < 5000 <= sum(len(t.encode()) for t in small)
    assert small == sample(0, 5000)[0] and small != sample(1, 5000)[0]


# --- the stages end to end -------------------------------------------------------------------------

def test_tokens_manifest_has_what_training_reads(run):
    manifest = json.loads((run / "tokens/manifest.json").read_text())
    # the default specials take the last five ids in list order; <|endoftext|> (the EOS) is first
    assert manifest["metrics"]["vocab_size"] == 320 and manifest["metrics"]["eos_id"] == 315
    assert manifest["metrics"]["special_tokens"] == {name: 315 + i for i, name in enumerate(CHAT_SPECIAL_TOKENS)}
    assert manifest["metrics"]["dtype"] == "uint16"
    counts = manifest["counts"]
    for split in ("train", "val"):
        assert counts[split]["tokens"] == sum(c[f"{split}_tokens"] for c in counts["by_source"].values())
        assert counts[split]["documents"] == sum(c[f"{split}_documents"] for c in counts["by_source"].values())
    assert counts["dropped"] == {"empty": 1}
    # 12 shard files, each named by its source's manifest and by the sealed one; 3 tokenizer files
    assert verify(run) == (2 * 12 + 3, [])


def test_shards_hold_every_document_then_eos_in_its_split(run, inputs):
    tokenizer = BPETokenizer.load(run / "tokenizer/tokenizer.json")
    manifest = json.loads((run / "tokens/manifest.json").read_text())
    for name, source in inputs.items():
        docs = list(read_documents(source))
        expected = {"val": [t for i, t in docs if is_val(i, CONFIG["val_fraction"])],
                    "train": [t for i, t in docs if not is_val(i, CONFIG["val_fraction"])] * int(source.weight)}
        for split, texts in expected.items():
            path = run / f"tokens/{split}/{name}.bin"
            tokens, index = read_shard(path, tokenizer.n_vocab)
            # index arithmetic: the last offset is the file size over the dtype size
            assert index[-1] == path.stat().st_size // 2 == len(tokens)
            assert len(index) - 1 == len(texts) == manifest["counts"]["by_source"][name][f"{split}_documents"]
            assert int(index[-1]) == manifest["counts"]["by_source"][name][f"{split}_tokens"]
            for k, text in enumerate(texts):
                doc = tokens[index[k]:index[k + 1]].tolist()
                assert doc[-1] == tokenizer.eos_id and tokenizer.eos_id not in doc[:-1]
                assert tokenizer.decode(doc[:-1]) == text
    assert len(expected["train"]) == 2 * len([t for i, t in docs if not is_val(i, CONFIG["val_fraction"])])


def test_tokenizer_outputs_and_compression_report(run):
    manifest = json.loads((run / "tokenizer/manifest.json").read_text())
    report = json.loads((run / "tokenizer/compression.json").read_text())
    assert manifest["metrics"]["vocab_size"] == 320 and manifest["metrics"]["merges"] == 320 - 256 - 5
    saved = json.loads((run / "tokenizer/tokenizer.json").read_text())["special_tokens"]
    assert saved == manifest["metrics"]["special_tokens"] == {name: 315 + i for i, name in enumerate(CHAT_SPECIAL_TOKENS)}
    assert set(report["by_source"]) == {"web", "stories", "chat"}
    total = report["total"]
    assert total["bytes_per_token_gpt2"] > total["bytes_per_token_ours"] > 1  # 320 ids compress less than 50,257
    assert total["bytes"] == sum(r["bytes"] for r in report["by_source"].values())
    assert "| **total** |" in (run / "tokenizer/compression.md").read_text()


def test_same_inputs_same_bytes(run, inputs, tmp_path):
    again = run_stages(inputs, tmp_path / "again")
    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and (p.suffix in (".bin", ".idx") or "tokenizer" in p.parts))
    assert len(files) == 3 * 4 + 4
    for rel in files:
        if rel.name != "manifest.json":  # manifests name their input paths, which differ here
            assert (run / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_gather_refuses_shards_of_another_tokenizer_or_a_changed_shard(run, inputs, tmp_path):
    other = run_stages({"web": inputs["web"]}, tmp_path / "other", {**CONFIG, "vocab_size": 300})
    manifests = [str(run / "tokens/web.manifest.json")]
    with pytest.raises(ValueError, match="another tokenizer"):
        main(["tokens", "--tokenizer", str(other / "tokenizer/tokenizer.json"), "--output",
              str(tmp_path / "m.json"), *manifests])
    shard = run / "tokens/train/web.bin"
    data = shard.read_bytes()
    try:
        shard.write_bytes(data[:-2])
        with pytest.raises(ValueError, match="train/web.bin: sha256 differs from .*web.manifest.json"):
            main(["tokens", "--tokenizer", str(run / "tokenizer/tokenizer.json"), "--output",
                  str(tmp_path / "m.json"), *manifests])
    finally:
        shard.write_bytes(data)


def test_shards_switch_to_uint32_past_65536_ids(tmp_path):
    docs = [[1, 70_000, 5], [], [65_536]]
    assert write_shard(tmp_path / "s.bin", docs, vocab_size=70_001) == (3, 4)
    tokens, index = read_shard(tmp_path / "s.bin", vocab_size=70_001)
    assert tokens.dtype == np.uint32 and (tmp_path / "s.bin").stat().st_size == 4 * 4
    assert index.tolist() == [0, 3, 3, 4] and tokens.tolist() == [1, 70_000, 5, 65_536]


def test_empty_corpus_fails_with_a_clear_message(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n<|endoftext|>\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        run_stages({"empty": Source("empty", str(empty), format="text")}, tmp_path / "out")
