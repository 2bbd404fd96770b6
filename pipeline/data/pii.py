"""pii: replace e-mail addresses and public IP addresses in kept text with placeholders, the
last text change before clean/ (FineWeb's PIIFormatter step, at the end of its pipeline).

- E-mail addresses: DataTrove's pattern (RFC 5322 local parts, dotted domains or [IP] literals).
- IPv4 addresses that are public (`ipaddress` `is_global`, multicast excluded): private (10/8,
  172.16/12, 192.168/16), loopback, link-local, shared (100.64/10), documentation, multicast and
  reserved ranges stay as they are, as in FineWeb (which replaces multicast addresses too). Unlike DataTrove's bare pattern, a dotted quad must
  stand alone: not after a letter, digit, `.` or `-`, not before a letter, digit, `-` or `.digit`.
  So version strings stay (`1.2.3.4-rc`, `v1.2.3.4`, `1.2.3.4.5`), while `8.8.8.8.` at the end
  of a sentence is an address. A bare `1.2.3.4` in prose is replaced: it is a public address.
  IPv6 addresses are not replaced.
- A placeholder is picked from the configured list by the sha256 of what it replaces, so an
  address always becomes the same placeholder, whatever the order of documents (DataTrove
  cycles through its list).

No document is dropped. The manifest counts replacements per kind, the documents changed, and
how many documents had how many replacements. `pii: false` turns the step off: the stage then
writes its input as it is, so clean/ always comes from here.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pipeline.config import section_config
from pipeline.data.docs import Doc
from pipeline.data.steps import Decision, add_stage_arguments, run_doc_stage

EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]*"
    r"[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.)"
    r"{3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[A-Za-z0-9-]*[A-Za-z0-9]:)\])")
OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # no leading zeros: 010 is not an octet here
IPV4 = re.compile(rf"(?<![\w.-]){OCTET}(?:\.{OCTET}){{3}}(?![\w-]|\.\d)")


def placeholder(found: str, placeholders: list[str]) -> str:
    digest = hashlib.sha256(found.encode("utf-8")).digest()
    return placeholders[int.from_bytes(digest[:8], "big") % len(placeholders)]


def anonymize(text: str, config: dict[str, Any], counts: Counter) -> str:
    """`text` with e-mails and public IPv4 addresses replaced; `counts` gets emails, ips and
    ips_kept (non-public addresses left alone)."""
    def email(match: re.Match) -> str:
        counts["emails"] += 1
        return placeholder(match.group(), config["email_placeholders"])

    def ip(match: re.Match) -> str:
        address = ipaddress.ip_address(match.group())
        if not address.is_global or address.is_multicast:  # Python counts 224/4 as global
            counts["ips_kept"] += 1
            return match.group()
        counts["ips"] += 1
        return placeholder(match.group(), config["ip_placeholders"])

    if config["emails"]:
        text = EMAIL.sub(email, text)
    if config["ips"]:
        text = IPV4.sub(ip, text)
    return text


def pii(docs_in: str, *, output: str, removed: str, manifest: str, config: dict[str, Any] | bool) -> dict[str, Any]:
    enabled = config is not False
    config = section_config("pii", {} if config in (True, False, None) else config)
    totals: Counter = Counter()
    per_doc: Counter = Counter()  # replacements in a document -> documents
    metrics: dict[str, Any] = {"enabled": enabled, "replaced": totals, "replacements_per_doc": per_doc}

    def decide(docs: Iterator[Doc]) -> Iterator[Decision]:
        for doc in docs:
            if not enabled:
                yield doc, None
                continue
            counts: Counter = Counter()
            text = anonymize(doc["text"], config, counts)
            totals.update(counts)
            totals["docs_changed"] += text != doc["text"]
            per_doc[str(counts["emails"] + counts["ips"])] += 1
            yield {**doc, "text": text}, None

    return run_doc_stage("pii", decide, docs_in=docs_in, docs_out=output, removed_out=removed, manifest=manifest,
                         config={"enabled": enabled, **config}, metrics=metrics)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, config_help="the `pii` config section as JSON (or @file); false turns it off")


def run(args: argparse.Namespace) -> int:
    pii(args.input, output=args.output, removed=args.removed, manifest=args.manifest, config=args.config)
    return 0
