"""Stages read only the files their upstream manifest names, checked against its sha256 first:
a stale file of an earlier config is never used, and a changed byte fails naming the file."""

from __future__ import annotations

import json

import pytest

from conftest import RESOURCES, make_docs, save_chat_model, write_stage_docs
from pipeline.__main__ import main
from pipeline.artifacts import ChangedInput, write_manifest
from pipeline.data.docs import DOC_COLUMNS, LANG_COLUMNS
from pipeline.token_shards import split_shards, write_shard

GPT2 = [str(RESOURCES / "gpt2" / "encoder.json"), str(RESOURCES / "gpt2" / "vocab.bpe")]


def flip_a_byte(path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def tokens(tmp_path):
    """tokens/ as the gather stage leaves it, plus a shard of an earlier config left in train/."""
    out = tmp_path / "tokens"
    for split, docs in (("train", [[1, 2, 3]] * 50), ("val", [[4, 5]] * 10)):
        write_shard(out / split / "web.bin", docs, 300)
    write_manifest(out / "manifest.json", stage="tokens", config={}, inputs=[],
                   outputs={p: None for p in sorted(out.rglob("web.*"))}, metrics={"vocab_size": 300, "eos_id": 299})
    write_shard(out / "train" / "old-config.bin", [[7]] * 999, 300)  # not in the manifest
    return out


def test_training_reads_the_shards_the_tokens_manifest_names_not_the_folder(tokens):
    assert split_shards(tokens, "train") == [tokens / "train" / "web.bin"]
    assert split_shards(tokens, "val") == [tokens / "val" / "web.bin"]


@pytest.mark.parametrize("name", ["web.bin", "web.idx"])
def test_a_changed_token_shard_is_not_trained_on(tokens, name):
    flip_a_byte(tokens / "train" / name, at=-3)
    with pytest.raises(ChangedInput, match=f"train/{name}: sha256 differs from {tokens / 'manifest.json'}"):
        split_shards(tokens, "train")


def test_a_changed_clean_shard_stops_the_tokenizer_naming_it(tmp_path, stories):
    clean = write_stage_docs(tmp_path / "clean" / "web.parquet", make_docs(stories[:20], lang="en", lang_score=0.9),
                             {**DOC_COLUMNS, **LANG_COLUMNS})
    flip_a_byte(clean)  # inside the zstd text: the parquet may still read, with other text
    tok = tmp_path / "tokenizer"
    with pytest.raises(ChangedInput, match=f"{clean}: sha256 differs from {clean.with_name('web.manifest.json')}"):
        main(["tokenizer", "--clean", str(clean), "--gpt2", *GPT2, "--tokenizer", str(tok / "tokenizer.json"),
              "--compression", str(tok / "c.json"), "--report", str(tok / "c.md"), "--manifest", str(tok / "manifest.json"),
              "--config", json.dumps({"vocab_size": 300})])
    assert not tok.exists()


def test_a_changed_parquet_stops_the_next_document_stage(tmp_path, stories):
    docs = write_stage_docs(tmp_path / "ingest" / "s.parquet", make_docs(stories[:5]), DOC_COLUMNS)
    flip_a_byte(docs)
    out = tmp_path / "langid"
    with pytest.raises(ChangedInput, match="ingest/s.parquet: sha256 differs"):
        main(["langid", "--input", str(docs), "--output", str(out / "s.parquet"), "--removed", str(out / "r.parquet"),
              "--manifest", str(out / "s.manifest.json")])
    assert not out.exists()


@pytest.fixture
def pretrained(tmp_path, stories):
    """(final.pt, tokenizer.json) as a results folder holds them, named by their manifest."""
    return save_chat_model(tmp_path / "pretrain", stories, seq_len=64, stage="pretrain")


def model_command(command, final, tokenizer, out):
    return {"eval": ["eval", "--model", f"pretrain={final}", "--tokens", str(out.parent / "tokens"),
                     "--tokenizer", str(tokenizer), "--out", str(out)],
            "export-hf": ["export-hf", "--model", str(final), "--tokenizer", str(tokenizer), "--out", str(out)],
            "inference-bench": ["inference-bench", "--model", str(final), "--tokenizer", str(tokenizer),
                                "--out", str(out), "--config", json.dumps({"workload": {"prompts": "random"}})],
            "serve": ["serve", "--model", str(final), "--tokenizer", str(tokenizer), "--port", "0"]}[command]


@pytest.mark.parametrize("changed", ["final.pt", "tokenizer.json"])
@pytest.mark.parametrize("command", ["eval", "export-hf", "inference-bench", "serve"])
def test_a_changed_model_or_tokenizer_stops_the_stage_naming_it(command, changed, pretrained, tmp_path, monkeypatch):
    import uvicorn

    def serve_unchecked(*args, **kwargs):
        raise AssertionError("serve started on a changed file")

    monkeypatch.setattr(uvicorn, "run", serve_unchecked)
    final, tokenizer = pretrained
    path = final.with_name(changed)
    flip_a_byte(path, at=len(path.read_bytes()) // 2)
    out = tmp_path / "out"
    with pytest.raises(ChangedInput, match=f"{path}: sha256 differs from {final.with_name('manifest.json')}"):
        main(model_command(command, final, tokenizer, out))
    assert not out.exists()
