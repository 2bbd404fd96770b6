"""url_filter: block lists with subdomain matching, drops counted as url_blocklist:<list>; shard
names of WET and WARC inputs never collide."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from conftest import ROOT, SAMPLE_WARC, write_warc
from pipeline.config import ConfigError, input_shards, warc_shards, wet_shards
from pipeline.data.url_filter import UrlFilter, block_lists, read_list, url_filter

TEST_LIST = ROOT / "tests" / "data" / "url_blocklist.txt"


@pytest.fixture
def check() -> UrlFilter:
    return UrlFilter([("demo", "domains", read_list(TEST_LIST)), ("words", "substrings", ["/casino/", "xxx"])])


@pytest.mark.parametrize("url, expected", [
    ("http://blocked.example/page", ("url_blocklist:demo", "blocked.example")),
    ("https://sub.blocked.example/a?b=c", ("url_blocklist:demo", "blocked.example")),   # a subdomain
    ("http://A.B.BLOCKED.EXAMPLE.:8080/", ("url_blocklist:demo", "blocked.example")),   # case, port, root dot
    ("http://notblocked.example/", None),                  # a look-alike domain
    ("http://blocked.example.evil.org/", None),            # the blocked name as a subdomain elsewhere
    ("http://example.org/?next=blocked.example", None),    # in the query, not the host
    ("http://news.example/casino/poker", ("url_blocklist:words", "/casino/")),
    ("http://news.example/casinos", None),
    ("not a url [", None),
])
def test_domains_with_subdomains_and_substrings(check, url, expected):
    assert check.check(url) == expected


def test_list_file_comments_and_case(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("# header\n\nExample.COM   # trailing comment\n  other.net\n")
    assert read_list(path) == ["example.com", "other.net"]


def test_blocked_response_dropped_with_list_name(tmp_path):
    page = b"<html><body><p>hello</p></body></html>"
    html = [("Content-Type", "text/html")]
    warc = write_warc(tmp_path / "t.warc.gz", [("http://ok.example/", "200 OK", html, page),
                                               ("http://www.sub.blocked.example/x", "200 OK", html, page),
                                               ("http://notblocked.example/", "200 OK", html, page)])
    out = tmp_path / "out"
    manifest = url_filter(str(warc), output=str(out / "kept.parquet"), removed=str(out / "removed.parquet"),
                          manifest=str(out / "m.json"), lists={"demo": str(TEST_LIST)},
                          config={"lists": [{"name": "demo", "path": "tests/data/url_blocklist.txt"}]})
    counts = manifest["counts"]
    assert counts["dropped"] == {"url_blocklist:demo": 1}
    assert counts["bytes_in"] == counts["bytes_out"] + counts["dropped_bytes"]["url_blocklist:demo"]
    kept = pl.read_parquet(out / "kept.parquet")
    assert kept["record"].to_list() == [0, 2] and kept["url"].to_list()[1] == "http://notblocked.example/"
    removed = pl.read_parquet(out / "removed.parquet").row(0, named=True)
    assert (removed["id"], removed["reason"], removed["match"]) == ("<urn:uuid:page-0001>", "url_blocklist:demo",
                                                                    "blocked.example")
    assert {entry["path"] for entry in manifest["inputs"]} == {str(warc), str(TEST_LIST)}


def test_block_list_paths_are_checked_and_relative(tmp_path):
    lists = block_lists([{"name": "demo", "path": "tests/data/url_blocklist.txt"},
                         {"name": "remote", "path": "https://lists.example/adult.txt"}], base=ROOT)
    assert lists["remote"] == "https://lists.example/adult.txt"
    assert not Path(lists["demo"]).is_absolute() and Path(lists["demo"]).resolve() == TEST_LIST
    with pytest.raises(ConfigError, match=r"url_filter.lists\[0\].path.*is not a file"):
        block_lists([{"name": "gone", "path": "no/such/list.txt"}], base=ROOT)
    with pytest.raises(ConfigError, match=r"url_filter.lists\[1\].name.*used twice"):
        block_lists([{"name": "a", "path": "https://x.example/1"}, {"name": "a", "path": "https://x.example/2"}])


def test_a_configured_list_without_its_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="list 'demo' has no file"):
        url_filter(str(SAMPLE_WARC), output=str(tmp_path / "k.parquet"), removed=str(tmp_path / "r.parquet"),
                   manifest=str(tmp_path / "m.json"), config={"lists": [{"name": "demo", "path": "x.txt"}]})


def test_warc_and_wet_shard_names_never_collide(tmp_path):
    for name in ("seg-00395.warc.gz", "seg-00395.warc.wet.gz", "seg-00396.warc.wet"):
        (tmp_path / name).write_bytes(b"x")
    wet, warc = input_shards({"wet": ["*.warc.wet.gz"], "warc": ["*.warc.gz"]}, base=tmp_path)
    assert list(wet) == ["seg-00395"] and list(warc) == ["seg-00395.warc"]  # a segment's WET and WARC
    # a WET file named x.warc.wet makes shard x.warc, as the WARC x.warc.gz does: refused, naming both
    (tmp_path / "seg-00396.warc.gz").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"inputs.warc.*seg-00396.warc.gz.*makes shard 'seg-00396.warc'.*seg-00396.warc.wet"):
        warc_shards(["seg-00396.warc.gz"], base=tmp_path, wet=wet_shards(["seg-00396.warc.wet"], base=tmp_path))


def test_no_input_at_all_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="inputs.wet' and 'inputs.warc': no input files"):
        input_shards({"wet": [], "warc": []}, base=tmp_path)
