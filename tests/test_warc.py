"""WARC input: url_filter -> extract on real WARC records (warcio) and the bundled Common Crawl WARC
sample; trafilatura does the extraction."""

from __future__ import annotations

import gzip

import polars as pl
import pytest

from conftest import SAMPLE_WARC, WARC_SAMPLES, write_warc, write_wet
from pipeline.data.extract import EXTRACTOR, decode_html, extract
from pipeline.data.url_filter import url_filter
from pipeline.data.warc import NotWarc, stream_records

HTML = [("Content-Type", "text/html; charset=utf-8")]
MENU = ["Home", "Products", "Pricing", "About us", "Contact", "Careers", "Press room"]
ARTICLE = [
    "The old harbour of the town was rebuilt in the spring, after two winters of storms had broken the "
    "eastern wall and filled the inner basin with sand and stones from the beach.",
    "Engineers from the county worked with local fishermen to choose a new shape for the wall, one that "
    "would turn the largest waves aside instead of meeting them head on, as the old wall had done.",
    "By the end of the summer the boats were back in the basin, and the fish market on the quay opened "
    "again on Saturday mornings, with more stalls than before the storms had come.",
]


def page(article: list[str] = ARTICLE) -> bytes:
    menu = "".join(f'<li><a href="/{i}">{item}</a></li>' for i, item in enumerate(MENU))
    body = "".join(f"<p>{p}</p>" for p in article)
    return (f"<!DOCTYPE html><html><head><title>Harbour news</title></head><body>"
            f"<header><nav><ul>{menu}</ul></nav></header>"
            f'<aside class="sidebar"><h3>Popular</h3><ul><li><a href="/x">Ten gadgets you need</a></li>'
            f'<li><a href="/y">Subscribe to our newsletter</a></li></ul></aside>'
            f"<main><article><h1>The harbour is open again</h1>{body}</article></main>"
            f"<footer><p>Copyright 2020 Harbour Times. All rights reserved. Privacy policy. Cookie settings.</p>"
            f"</footer></body></html>").encode("utf-8")


def run_warc(tmp_path, warc, url_config=None, lists=None, **extract_config):
    out = tmp_path / "out"
    url_filter(str(warc), output=str(out / "url_filter" / "s.parquet"), removed=str(out / "rm_url.parquet"),
               manifest=str(out / "url_filter" / "s.manifest.json"), config=url_config or {}, lists=lists)
    manifest = extract(str(warc), str(out / "url_filter" / "s.parquet"), output=str(out / "extract.parquet"),
                       removed=str(out / "rm_extract.parquet"), manifest=str(out / "extract.manifest.json"),
                       config=extract_config)
    return manifest["counts"], pl.read_parquet(out / "extract.parquet"), pl.read_parquet(out / "rm_extract.parquet")


def test_article_text_without_menu_sidebar_or_footer(tmp_path):
    warc = write_warc(tmp_path / "t.warc.gz", [("http://news.example/harbour", "200 OK", HTML, page())])
    counts, kept, _ = run_warc(tmp_path, warc)
    assert counts["docs_out"] == 1
    text = kept["text"][0]
    for paragraph in ARTICLE:
        assert paragraph in text
    for boilerplate in [*MENU, "Ten gadgets", "newsletter", "Copyright 2020", "Cookie settings"]:
        assert boilerplate not in text, boilerplate
    row = kept.row(0, named=True)
    assert (row["input"], row["extractor"], row["id"]) == ("warc", EXTRACTOR, "<urn:uuid:page-0000>")
    assert row["url"] == "http://news.example/harbour"


@pytest.mark.parametrize("status, headers, payload, reason", [
    ("200 OK", [("Content-Type", "image/png")], b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "not_html"),
    ("200 OK", [("Content-Type", "application/pdf")], b"%PDF-1.4 ...", "not_html"),
    ("404 Not Found", HTML, page(), "http_status"),
    ("301 Moved Permanently", [*HTML, ("Location", "http://news.example/new")], b"", "http_status"),
    ("200 OK", [("Content-Type", "text/html")], bytes(range(256)) * 8, "decode_error"),  # no charset fits
    ("200 OK", [*HTML, ("Content-Encoding", "gzip")], b"not gzip data at all", "decode_error"),
    ("200 OK", HTML, page() * 40, "too_large"),
    ("200 OK", HTML, b"<html><body><nav><ul><li><a href=/>Home</a></li><li><a href=/a>About</a></li></ul></nav>"
                     b"<footer>Copyright</footer></body></html>", "extraction_empty"),  # no main text
])
def test_bad_response_dropped_with_reason(tmp_path, status, headers, payload, reason):
    good = ("http://news.example/a", "200 OK", HTML, page())
    warc = write_warc(tmp_path / "t.warc.gz", [good, ("http://news.example/b", status, headers, payload), good])
    counts, kept, removed = run_warc(tmp_path, warc, max_html_bytes=20000)
    assert counts["dropped"] == {reason: 1}
    assert kept["id"].to_list() == ["<urn:uuid:page-0000>", "<urn:uuid:page-0002>"]
    assert removed.row(0, named=True)["reason"] == reason and removed["id"][0] == "<urn:uuid:page-0001>"
    assert counts["bytes_in"] > counts["bytes_out"] > 0


def test_gzip_content_encoding_is_undone(tmp_path):
    warc = write_warc(tmp_path / "t.warc.gz", [("http://news.example/z", "200 OK", [*HTML, ("Content-Encoding", "gzip")],
                                               gzip.compress(page()))])
    _, kept, _ = run_warc(tmp_path, warc)
    assert ARTICLE[0] in kept["text"][0]


def test_extraction_timeout_drops_the_page(tmp_path):
    warc = write_warc(tmp_path / "t.warc.gz", [("http://news.example/slow", "200 OK", HTML, page(ARTICLE * 50))])
    counts, kept, removed = run_warc(tmp_path, warc, timeout_s=1e-6)
    assert counts["dropped"] == {"extraction_timeout": 1} and kept.height == 0
    assert removed["text"][0].startswith("<!DOCTYPE html>")  # the HTML is kept for inspection


@pytest.mark.parametrize("payload, content_type, how", [
    ("<p>Привет, как дела?</p>".encode("cp1251"), "text/html; charset=windows-1251", "http_charset"),
    ('<meta charset="gb2312"><p>中文 镕</p>'.encode("gb18030"), "text/html", "meta_charset"),  # 镕 is not in GB2312
    ("<p>naïve café</p>".encode("utf-8"), "text/html; charset=nonsense-charset", "utf-8"),
])
def test_charset_declared_then_utf8(payload, content_type, how):
    text, used = decode_html(payload, content_type)
    assert used == how and text == payload.decode({"http_charset": "cp1251", "meta_charset": "gb18030"}.get(how, "utf-8"))


def test_extraction_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):  # twice in one process: trafilatura's dedup cache must not carry over
        counts, kept, _ = run_warc(tmp_path / name, SAMPLE_WARC)
        runs.append((tmp_path / name / "out" / "extract.parquet").read_bytes())
    assert runs[0] == runs[1]
    assert counts["docs_in"] == 16 and counts["docs_out"] >= 14  # the sample's 16 HTML responses


def test_wet_file_under_inputs_warc_fails_pointing_to_inputs_wet(tmp_path):
    wet = write_wet(tmp_path / "x.warc.wet.gz", [b"some text\n"])
    with pytest.raises(NotWarc, match="found conversion: 1.*list it under inputs.wet") as raised:
        run_warc(tmp_path, wet)
    assert str(wet) in str(raised.value)


def test_stale_url_filter_list_fails(tmp_path):
    warc = write_warc(tmp_path / "t.warc.gz", [("http://news.example/a", "200 OK", HTML, page())])
    run_warc(tmp_path, warc)
    other = write_warc(tmp_path / "t2.warc.gz", [("http://news.example/a", "200 OK", HTML, page())] * 2)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="is stale"):
        extract(str(other), str(out / "url_filter" / "s.parquet"), output=str(out / "e2.parquet"),
                removed=str(out / "r2.parquet"), manifest=str(out / "e2.manifest.json"), config={})


def test_whirlwind_warc_and_wet_hold_the_same_page(tmp_path):
    """The WARC's trafilatura text is the article; Common Crawl's WET text of the same page is longer
    (it keeps the menus). docs/data.md compares them."""
    _, kept, _ = run_warc(tmp_path, WARC_SAMPLES / "whirlwind.warc.gz")
    (url,) = kept["url"].to_list()
    assert url == "https://an.wikipedia.org/wiki/Escopete"
    _, _, records = stream_records(str(WARC_SAMPLES / "whirlwind.warc.wet.gz"), [])
    ((headers, _, body, _),) = [r for r in records if r[0].get_header("WARC-Type") == "conversion"]
    assert headers.get_header("WARC-Target-URI") == url
    text, wet_text = kept["text"][0], body.decode("utf-8")
    assert 500 < len(text) < len(wet_text) * 0.6
    assert "Politica de privacidat" in wet_text and "Politica de privacidat" not in text  # the site's footer
