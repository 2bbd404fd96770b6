"""langid with the real lid.176 model: labels, thresholds, newline handling, drop reasons."""

from __future__ import annotations

import polars as pl
import pytest

from conftest import make_docs, write_stage_docs
from pipeline.config import ConfigError
from pipeline.data.docs import DOC_COLUMNS
from pipeline.data.langid import langid, load_model, predict

TEXTS = {
    "en": "The quick brown fox jumps over the lazy dog while the children watch from the garden.",
    "fr": "Le renard brun rapide saute par-dessus le chien paresseux pendant que les enfants regardent.",
    "zh": "敏捷的棕色狐狸跳过了懒惰的狗，孩子们在花园里看着。",
    "ru": "Быстрая коричневая лиса прыгает через ленивую собаку, а дети смотрят из сада.",
}


@pytest.fixture(scope="module")
def model():
    return load_model(None)[0]


def test_bundled_lid176_predicts_languages(model):
    labels = predict(model, list(TEXTS.values()))
    assert [lang for lang, _ in labels] == list(TEXTS)
    assert all(0.5 < score <= 1.0 for _, score in labels)


def test_newlines_do_not_break_prediction(model):
    # fastText's predict rejects a newline inside a line; we join lines with spaces first
    assert predict(model, ["The cat sat.\nOn the mat.\n\nIt was warm."])[0][0] == "en"


def run_langid(tmp_path, texts, **config):
    src = tmp_path / "in.parquet"
    write_stage_docs(src, make_docs(texts), DOC_COLUMNS)
    manifest = langid(str(src), output=str(tmp_path / "out.parquet"), removed=str(tmp_path / "rm.parquet"),
                      manifest=str(tmp_path / "m.json"), config=config)
    return manifest, pl.read_parquet(tmp_path / "out.parquet"), pl.read_parquet(tmp_path / "rm.parquet")


def test_stage_keeps_configured_languages_and_labels_every_doc(tmp_path):
    manifest, kept, removed = run_langid(tmp_path, list(TEXTS.values()), languages=["en", "fr"])
    assert kept["lang"].to_list() == ["en", "fr"] and kept["lang_score"].min() >= 0.65
    assert removed["reason"].to_list() == ["language_not_kept"] * 2
    assert removed["lang"].to_list() == ["zh", "ru"]  # the audit shows what it was
    assert manifest["counts"]["dropped"] == {"language_not_kept": 2}
    assert manifest["metrics"]["languages_in"] == {"en": 1, "fr": 1, "ru": 1, "zh": 1}


def test_low_confidence_is_its_own_reason(tmp_path):
    manifest, kept, removed = run_langid(tmp_path, [TEXTS["en"], "ok ok 123 lol"], min_score=0.99)
    assert manifest["counts"]["dropped"].get("low_confidence", 0) >= 1
    assert set(removed["reason"]) <= {"low_confidence", "language_not_kept"}


def test_missing_model_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="langid.model"):
        load_model(str(tmp_path / "lid.176.bin"))


def test_nothing_kept_still_writes_the_language_columns(tmp_path):
    _, kept, removed = run_langid(tmp_path, [TEXTS["zh"], TEXTS["ru"]])
    assert kept.height == 0 and {"lang", "lang_score"} <= set(kept.columns)
    assert removed.height == 2
