"""pii: e-mail and public IPv4 addresses become placeholders; private ranges and version strings
stay; the same address always gets the same placeholder; `pii: false` copies the text."""

from __future__ import annotations

from collections import Counter

import polars as pl
import pytest

from conftest import make_docs, write_stage_docs
from pipeline.config import section_config
from pipeline.data.docs import DOC_COLUMNS, LANG_COLUMNS
from pipeline.data.pii import anonymize, pii

CONFIG = section_config("pii", {})
EMAILS, IPS = set(CONFIG["email_placeholders"]), set(CONFIG["ip_placeholders"])


def test_emails_replaced():
    counts = Counter()
    text = anonymize("Write to john.doe+news@gmail.com or INFO@shop.co.uk today.", CONFIG, counts)
    assert "gmail" not in text and "shop.co.uk" not in text
    words = text.split()
    assert words[2] in EMAILS and words[4] in EMAILS and counts["emails"] == 2


@pytest.mark.parametrize("ip, replaced", [
    ("8.8.8.8", True), ("81.2.69.160", True), ("1.2.3.4", True),          # public
    ("192.168.1.1", False), ("10.0.0.7", False), ("172.16.5.4", False),   # private
    ("127.0.0.1", False), ("169.254.1.1", False), ("100.64.1.1", False),  # loopback, link-local, shared
    ("192.0.2.1", False), ("224.0.0.1", False), ("0.0.0.0", False),       # documentation, multicast, this host
])
def test_public_ips_replaced_private_and_reserved_kept(ip, replaced):
    counts = Counter()
    text = anonymize(f"The server at {ip} answered.", CONFIG, counts)
    address = text.split()[3]
    assert (address in IPS) == replaced and (address == ip) == (not replaced)
    assert counts["ips" if replaced else "ips_kept"] == 1


@pytest.mark.parametrize("text", [
    "Upgrade to 1.2.3.4-rc now.", "Built with v1.2.3.4 today.", "Section 1.2.3.4.5 says so.",
    "Tag release-8.8.8.8 shipped.", "Not an address: 999.1.1.1 or 010.1.1.1 here.",
])
def test_version_strings_and_non_addresses_stay(text):
    counts = Counter()
    assert anonymize(text, CONFIG, counts) == text and counts["ips"] == 0


def test_address_at_a_sentence_end_is_replaced():
    text = anonymize("Our DNS is 8.8.8.8.", CONFIG, Counter())
    assert text.endswith(".") and text[len("Our DNS is "):-1] in IPS


def test_same_address_same_placeholder_in_any_order():
    a = anonymize("a 8.8.8.8 b 9.9.9.9 c 8.8.8.8", CONFIG, Counter()).split()
    b = anonymize("9.9.9.9 then 8.8.8.8", CONFIG, Counter()).split()
    assert a[1] == a[5] == b[2] and a[3] == b[0]


def stage(tmp_path, config):
    docs = make_docs(["Mail me at jane@example.net from 8.8.4.4 or 192.168.0.2.", "Nothing personal here."],
                     input="wet", extractor="commoncrawl-wet", lang="en", lang_score=0.9)
    src = write_stage_docs(tmp_path / "in" / "s.parquet", docs, {**DOC_COLUMNS, **LANG_COLUMNS})
    manifest = pii(str(src), output=str(tmp_path / "out" / "s.parquet"), removed=str(tmp_path / "rm.parquet"),
                   manifest=str(tmp_path / "out" / "s.manifest.json"), config=config)
    return manifest, pl.read_parquet(tmp_path / "out" / "s.parquet")["text"].to_list()


def test_stage_counts_per_document(tmp_path):
    manifest, texts = stage(tmp_path, {})
    assert "jane@" not in texts[0] and "8.8.4.4" not in texts[0] and "192.168.0.2" in texts[0]
    assert texts[1] == "Nothing personal here."
    metrics = manifest["metrics"]
    assert metrics["enabled"] is True
    assert metrics["replaced"] == {"emails": 1, "ips": 1, "ips_kept": 1, "docs_changed": 1}
    assert metrics["replacements_per_doc"] == {"0": 1, "2": 1}
    assert manifest["counts"]["docs_in"] == manifest["counts"]["docs_out"] == 2


def test_pii_false_turns_it_off(tmp_path):
    manifest, texts = stage(tmp_path, False)
    assert texts[0] == "Mail me at jane@example.net from 8.8.4.4 or 192.168.0.2."
    assert manifest["metrics"]["enabled"] is False and manifest["config"]["enabled"] is False
