"""WARC input: extraction speed beside langid and quality, and what trafilatura keeps against
WET-style text of the same pages.

    .venv/bin/python -m benchmarks.bench_warc --repeat 5   # writes the `WARC extraction` section of docs/benchmarks.md

Pages: every HTML response of the bundled WARC samples (resources/commoncrawl/warc/: 16 Common
Crawl responses and the whirlwind page). For each page two texts go through langid (the preset's
languages) and quality (default thresholds): trafilatura's main text with the extract stage's
settings, and all of the page's text, which is what a WET record holds. Common Crawl's own WET
text exists only for the whirlwind page (whirlwind.warc.wet.gz), so for the other 16 the
all-text side is trafilatura's `html2txt` (its baseline: every text node, boilerplate included),
a stand-in for Common Crawl's converter, not the same program. Timings repeat the pages
`--repeat` times (trafilatura's dedup cache is new per repeat, as per job).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

import trafilatura

from benchmarks.common import machine, write_section
from pipeline.config import section_config
from pipeline.data.extract import Extractor, read_html
from pipeline.data.ingest import stream_records
from pipeline.data.langid import load_model, predict
from pipeline.data.quality import build_filters, judge
from pipeline.data.url_filter import response_records

ROOT = Path(__file__).resolve().parent.parent
WARC_DIR = ROOT / "resources" / "commoncrawl" / "warc"
LANGUAGES = {"en", "zh", "ru", "de", "nl", "an"}  # workflow/configs/warc.yaml
MIN_SCORE = section_config("langid", {})["min_score"]


def pages() -> list[dict]:
    """url, html and (whirlwind only) Common Crawl's WET text of every HTML response."""
    config, found = section_config("extract", {}), []
    for path in sorted(WARC_DIR.glob("*.warc.gz")):
        for _, headers, _, block, problem in response_records(str(path), Counter(), []):
            reason, _, html = read_html(headers, block, problem, config, Counter())
            if reason is None:
                found.append({"url": headers.get_header("WARC-Target-URI"), "html": html, "wet": None})
    for headers, _, body, _ in stream_records(str(WARC_DIR / "whirlwind.warc.wet.gz"), [])[2]:
        for page in found:
            if page["url"] == headers.get_header("WARC-Target-URI"):
                page["wet"] = body.decode("utf-8")
    return found


def verdicts(model, filters, texts: list[str]) -> list[tuple[str, float, str]]:
    """(language, score, 'kept' or the first drop reason) of each text through langid and quality."""
    out = []
    for text, (lang, score) in zip(texts, predict(model, texts)):
        if not text:
            out.append(("-", 0.0, "extraction_empty"))
        elif lang not in LANGUAGES:
            out.append((lang, score, "language_not_kept"))
        elif score < MIN_SCORE:
            out.append((lang, score, "low_confidence"))
        else:
            out.append((lang, score, judge(filters, {"text": text})[1] or "kept"))
    return out


def timed_rate(fn, items: list, repeat: int) -> tuple[int, float]:
    start = time.perf_counter()
    for _ in range(repeat):
        fn(items)
    return len(items) * repeat, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="time the pages this many times over")
    args = parser.parse_args()
    found = pages()
    config = section_config("extract", {})
    main_texts = [Extractor(config)(p["html"], p["url"]) or "" for p in found]
    all_texts = [trafilatura.html2txt(p["html"]) for p in found]
    model = load_model(None)[0]
    filters = build_filters(section_config("quality", {}))

    def extract_all(items):
        extractor = Extractor(config)  # a new dedup cache per pass, as per job
        for p in items:
            extractor(p["html"], p["url"])

    speed = [("trafilatura extract (FineWeb settings)", *timed_rate(extract_all, found, args.repeat)),
             ("html2txt (all text, the WET stand-in)",
              *timed_rate(lambda items: [trafilatura.html2txt(p["html"]) for p in items], found, args.repeat)),
             ("langid predict (extracted text)", *timed_rate(lambda t: predict(model, t), main_texts, args.repeat)),
             ("quality (extracted text)",
              *timed_rate(lambda t: [judge(filters, {"text": x}) for x in t], main_texts, args.repeat))]

    ours, stand_in = verdicts(model, filters, main_texts), verdicts(model, filters, all_texts)
    lines = [f"Command: `.venv/bin/python -m benchmarks.bench_warc --repeat {args.repeat}`  ",
             f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end (other work on "
             "the machine slows every row alike).", "",
             f"Pages: the {len(found)} HTML responses of `resources/commoncrawl/warc/` (mean HTML "
             f"{sum(len(p['html']) for p in found) / len(found) / 1000:.0f} k characters).", "",
             "| work | documents | seconds | docs/s |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {n} | {seconds:.3f} | {n / seconds:,.1f} |" for name, n, seconds in speed]
    lines += ["", f"Through langid (languages {sorted(LANGUAGES)}, min_score {MIN_SCORE}) and quality (defaults):", "",
              "| page | chars: main text / all text | lang, score: main / all | main text (trafilatura) | all text (html2txt) |",
              "| --- | ---: | --- | --- | --- |"]
    for p, main_text, all_text, a, b in zip(found, main_texts, all_texts, ours, stand_in):
        lines.append(f"| {p['url'][:48]} | {len(main_text):,} / {len(all_text):,} | {a[0]} {a[1]:.2f} / "
                     f"{b[0]} {b[1]:.2f} | {a[2]} | {b[2]} |")
    kept = lambda vs: sum(v[2] == "kept" for v in vs)  # noqa: E731
    lines += ["", f"Kept: **{kept(ours)} of {len(found)}** pages with trafilatura's main text, "
              f"**{kept(stand_in)} of {len(found)}** with all their text."]
    for p, main_text, a in zip(found, main_texts, ours):
        if p["wet"] is not None:
            (w,) = verdicts(model, filters, [p["wet"]])
            lines += ["", f"Common Crawl's own WET text of {p['url']}: {len(p['wet']):,} characters, "
                      f"{w[0]} {w[1]:.2f}, {w[2]}; trafilatura's text of its WARC record: {len(main_text):,} "
                      f"characters, {a[0]} {a[1]:.2f}, {a[2]}."]
    body = "\n".join(lines)
    print(body)
    write_section("WARC extraction", body)


if __name__ == "__main__":
    main()
