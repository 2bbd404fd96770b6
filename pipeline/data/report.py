"""data-report: the drop report of the web-data stages, from their sealed manifests.

Writes `drop_report.json` (the contract: `stages` in pipeline order, each with docs and bytes in
and out and drops per reason), `drop_report.md` for people, and three plots: the funnel, drops by
reason, and the language mix. The run's entry points (`--entries`: wet, warc) each have their
chain of stages (ingest; url_filter -> extract), which meet at langid. It checks the funnel
arithmetic (every stage's `docs_in` equals its `docs_out` plus its drops, and the previous
stage's `docs_out` in its chain; langid's `docs_in` the sum over the chains) and fails naming the
stage if not.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_json, atomic_write_text, read_manifest, write_manifest
from pipeline.figures import pyplot, save_figure

log = logging.getLogger(__name__)

# (report name, folder whose sealed manifest counts that stage), in pipeline order: each entry
# point's chain (only those the run has), then the stages every document goes through
ENTRY_STAGES = {"wet": [("ingest", "ingest")], "warc": [("url_filter", "url_filter"), ("extract", "extract")]}
SHARED_STAGES = [("langid", "langid"), ("quality", "quality"), ("dedup", "deduped"),
                 ("decontaminate", "decontaminated"), ("pii", "clean")]
FIELDS = ("docs_in", "docs_out", "bytes_in", "bytes_out")


def stage_list(entries: list[str]) -> list[tuple[str, str, str]]:
    """(name, folder, entry point or "shared") of every stage the run's entry points pass through."""
    unknown = set(entries) - set(ENTRY_STAGES)
    if not entries or unknown:
        raise ValueError(f"data-report: entry points must be some of {sorted(ENTRY_STAGES)}, got {entries}")
    chains = [(name, folder, entry) for entry in ENTRY_STAGES if entry in entries for name, folder in ENTRY_STAGES[entry]]
    return chains + [(name, folder, "shared") for name, folder in SHARED_STAGES]


def stage_rows(data: Path, entries: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name, folder, entry in stage_list(entries):
        counts = read_manifest(data / folder / "manifest.json")["counts"]
        rows.append({"name": name, "entry": entry, **{f: counts[f] for f in FIELDS}, "dropped": counts["dropped"],
                     "errors": counts.get("errors", [])})
    return rows


def check_funnel(rows: list[dict[str, Any]]) -> None:
    """Each stage's docs_in equals its docs_out plus drops and the docs_out of the stage before it
    in its chain; the first shared stage takes in the sum of every entry chain's last docs_out."""
    last_of_chain: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["docs_in"] != row["docs_out"] + sum(row["dropped"].values()):
            raise ValueError(f"stage {row['name']}: docs_in {row['docs_in']} != docs_out {row['docs_out']} "
                             f"+ dropped {sum(row['dropped'].values())}")
        if row["entry"] == "shared" and "shared" not in last_of_chain:
            feeds = list(last_of_chain.values())
            if row["docs_in"] != sum(prev["docs_out"] for prev in feeds):
                raise ValueError(f"stage {row['name']}: docs_in {row['docs_in']} != docs_out of "
                                 + " + ".join(f"{p['name']} ({p['docs_out']})" for p in feeds))
        elif (prev := last_of_chain.get(row["entry"])) and row["docs_in"] != prev["docs_out"]:
            raise ValueError(f"stage {row['name']}: docs_in {row['docs_in']} != {prev['name']} docs_out "
                             f"{prev['docs_out']}")
        last_of_chain[row["entry"]] = row


def build_report(data: Path, entries: list[str]) -> dict[str, Any]:
    rows = stage_rows(data, entries)
    check_funnel(rows)
    clusters = read_manifest(data / "dedup" / "manifest.json")["metrics"]
    languages = read_manifest(data / "langid" / "manifest.json")["metrics"].get("languages_in", {})
    pii = read_manifest(data / "clean" / "manifest.json")["metrics"]
    # a damaged input file is named by the first stage that reads it (extract reads it again)
    firsts = {row["entry"]: row for row in reversed(rows) if row["entry"] != "shared"}
    return {
        "entries": entries,
        "stages": [{k: v for k, v in row.items() if k != "errors"} for row in rows],
        "contamination": contamination(data),
        "input_errors": [error for row in firsts.values() for error in row["errors"]],
        "languages_in": dict(sorted(languages.items(), key=lambda kv: (-kv[1], kv[0]))),
        "dedup": {k: clusters[k] for k in ("clusters", "cluster_sizes", "removed", "example_pairs")},
        "pii": {"enabled": pii["enabled"], "replaced": pii["replaced"]},
    }


def contamination(data: Path) -> dict[str, Any]:
    """Documents overlapping each eval set (summed over the decontaminate jobs by the seal), and
    whether they were removed."""
    manifest = read_manifest(data / "decontaminated" / "manifest.json")
    return {"overlapping_docs": manifest["metrics"]["overlapping_docs"], "removed": manifest["config"]["remove"]}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Drop report", "", "| stage | docs in | docs out | kept % | MB in | MB out | dropped (reason: count) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in report["stages"]:
        kept = 100 * row["docs_out"] / row["docs_in"] if row["docs_in"] else 0.0
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(row["dropped"].items(), key=lambda kv: -kv[1])) or "none"
        name = row["name"] if row["entry"] == "shared" else f"{row['name']} ({row['entry'].upper()})"
        lines.append(f"| {name} | {row['docs_in']} | {row['docs_out']} | {kept:.1f} | "
                     f"{row['bytes_in'] / 1e6:.2f} | {row['bytes_out'] / 1e6:.2f} | {reasons} |")
    lines += ["", "Dropped documents, with their reason, are under `removed/<stage>/`.", ""]
    if report["input_errors"]:
        lines += ["## Damaged input files", ""]
        lines += [f"- `{e['file']}`: {e['error']} (after {e['records_before']} records, which were kept)"
                  for e in report["input_errors"]]
        lines.append("")
    dedup = report["dedup"]
    removed = ", ".join(f"{reason}: {n}" for reason, n in dedup["removed"].items()) or "nothing"
    lines += ["## Dedup", "", f"{dedup['clusters']} clusters; removed {removed}.", "",
              "| cluster size | clusters |", "| ---: | ---: |"]
    lines += [f"| {size} | {n} |" for size, n in dedup["cluster_sizes"].items()]
    if dedup["example_pairs"]:
        lines += ["", "| removed | kept (representative) | reason | est. Jaccard |", "| --- | --- | --- | ---: |"]
        lines += [f"| {p['url']} | {p['duplicate_of_url']} | {p['reason']} | {p['similarity']:.3f} |"
                  for p in dedup["example_pairs"]]
    found = report["contamination"]
    lines += ["", "## Contamination (n-gram overlap with the eval sets)", "",
              f"Overlapping documents were {'removed' if found['removed'] else 'counted, not removed'}.", "",
              "| eval set | overlapping docs |", "| --- | ---: |"]
    lines += [f"| {name} | {n} |" for name, n in found["overlapping_docs"].items()]
    pii, n = report["pii"], report["pii"]["replaced"]
    lines += ["", "## PII", "", f"Replaced: {n.get('emails', 0)} e-mail and {n.get('ips', 0)} public IPv4 addresses; "
              f"documents changed: {n.get('docs_changed', 0)}; non-public addresses kept: {n.get('ips_kept', 0)}."
              if pii["enabled"] else "Off (`pii: false`)."]
    lines += ["", "## Languages in (fastText lid.176, top 15)", "", "| language | docs |", "| --- | ---: |"]
    lines += [f"| {lang} | {n} |" for lang, n in list(report["languages_in"].items())[:15]]
    return "\n".join(lines) + "\n"


def plot_funnel(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = report["stages"]
    firsts = [r for i, r in enumerate(rows) if r["entry"] != "shared" and (i == 0 or rows[i - 1]["entry"] != r["entry"])]
    labels = [f"{r['entry'].upper()} records" for r in firsts] + [f"after {r['name']}" for r in rows]
    docs = [r["docs_in"] for r in firsts] + [r["docs_out"] for r in rows]
    mbytes = [r["bytes_in"] / 1e6 for r in firsts] + [r["bytes_out"] / 1e6 for r in rows]
    fig, (ax_docs, ax_bytes) = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, values, unit in ((ax_docs, docs, "documents"), (ax_bytes, mbytes, "MB of text")):
        bars = ax.barh(labels[::-1], values[::-1], color="#4C72B0")
        ax.bar_label(bars, fmt="%.0f" if unit == "documents" else "%.2f", padding=3)
        ax.set_xlabel(unit)
        ax.margins(x=0.15)
    fig.suptitle("Web-data funnel")
    save_figure(fig, path)


def plot_reasons(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    items = [(f"{r['name']}: {reason}", n) for r in report["stages"] for reason, n in r["dropped"].items()]
    items.sort(key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(items), 3) + 1))
    if items:
        bars = ax.barh([k for k, _ in items], [n for _, n in items], color="#C44E52")
        ax.bar_label(bars, padding=3)
    ax.set_xlabel("documents dropped")
    ax.set_title("Drops by stage and reason")
    save_figure(fig, path)


def plot_languages(report: dict[str, Any], path: Path, top: int = 15) -> None:
    plt = pyplot()
    items = list(report["languages_in"].items())[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * max(len(items), 3) + 1))
    if items:
        bars = ax.barh([k for k, _ in items], [n for _, n in items], color="#55A868")
        ax.bar_label(bars, padding=3)
    ax.set_xlabel("documents (top language, before the langid filter)")
    ax.set_title(f"Language mix, top {top}")
    save_figure(fig, path)


def data_report(data: str | Path, entries: list[str] = ("wet",)) -> dict[str, Any]:
    data = Path(data)
    entries = list(entries)
    report = build_report(data, entries)
    atomic_write_json(data / "drop_report.json", report)
    atomic_write_text(data / "drop_report.md", markdown(report))
    plots = {name: data / "plots" / f"{name}.png" for name in ("funnel", "drop_reasons", "languages")}
    plot_funnel(report, plots["funnel"])
    plot_reasons(report, plots["drop_reasons"])
    plot_languages(report, plots["languages"])
    outputs = [data / "drop_report.json", data / "drop_report.md", *plots.values()]
    write_manifest(data / "manifest.json", stage="data_report", config={},
                   inputs=[data / folder / "manifest.json" for _, folder, _ in stage_list(entries)]
                   + [data / "dedup" / "manifest.json"],
                   outputs={p: None for p in outputs},
                   counts={r["name"]: {f: r[f] for f in ("docs_in", "docs_out")} for r in report["stages"]})
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="the run's data folder, e.g. results/sample/data")
    parser.add_argument("--entries", nargs="+", default=["wet"], choices=sorted(ENTRY_STAGES),
                        help="the run's entry points (inputs.wet, inputs.warc), whose stages the report reads")


def run(args: argparse.Namespace) -> int:
    report = data_report(args.data, args.entries)
    for row in report["stages"]:
        log.info("%-8s %6d -> %6d  %s", row["name"], row["docs_in"], row["docs_out"], row["dropped"])
    return 0
