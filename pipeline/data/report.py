"""data-report: the drop report of the web-data stages, from their sealed manifests.

Writes `drop_report.json` (the contract: `stages` in pipeline order, each with docs and bytes in
and out and drops per reason), `drop_report.md` for people, and three plots: the funnel, drops by
reason, and the language mix. It checks the funnel arithmetic (every stage's `docs_in` equals its
`docs_out` plus its drops, and the previous stage's `docs_out`) and fails naming the stage if not.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.artifacts import atomic_path, atomic_write_json, atomic_write_text, read_manifest, write_manifest  # noqa: E402

log = logging.getLogger(__name__)

# (report name, folder whose sealed manifest counts that stage), in pipeline order
STAGES = [("ingest", "ingest"), ("langid", "langid"), ("quality", "quality"), ("dedup", "deduped"),
          ("decontaminate", "clean")]
FIELDS = ("docs_in", "docs_out", "bytes_in", "bytes_out")


def stage_rows(data: Path) -> list[dict[str, Any]]:
    rows = []
    for name, folder in STAGES:
        counts = read_manifest(data / folder / "manifest.json")["counts"]
        rows.append({"name": name, **{f: counts[f] for f in FIELDS}, "dropped": counts["dropped"]})
    return rows


def check_funnel(rows: list[dict[str, Any]]) -> None:
    for prev, row in zip([None, *rows], rows):
        if row["docs_in"] != row["docs_out"] + sum(row["dropped"].values()):
            raise ValueError(f"stage {row['name']}: docs_in {row['docs_in']} != docs_out {row['docs_out']} "
                             f"+ dropped {sum(row['dropped'].values())}")
        if prev and row["docs_in"] != prev["docs_out"]:
            raise ValueError(f"stage {row['name']}: docs_in {row['docs_in']} != {prev['name']} docs_out "
                             f"{prev['docs_out']}")


def build_report(data: Path) -> dict[str, Any]:
    rows = stage_rows(data)
    check_funnel(rows)
    ingest = read_manifest(data / "ingest" / "manifest.json")
    clusters = read_manifest(data / "dedup" / "manifest.json")["metrics"]
    languages = read_manifest(data / "langid" / "manifest.json")["metrics"].get("languages_in", {})
    return {
        "stages": rows,
        "contamination": contamination(data),
        "input_errors": ingest["counts"].get("errors", []),
        "languages_in": dict(sorted(languages.items(), key=lambda kv: (-kv[1], kv[0]))),
        "dedup": {k: clusters[k] for k in ("clusters", "cluster_sizes", "removed", "example_pairs")},
    }


def contamination(data: Path) -> dict[str, Any]:
    """Documents overlapping each eval set (summed over the decontaminate jobs), and whether they were removed."""
    overlapping: dict[str, int] = {}
    remove = None
    for shard_manifest in sorted((data / "clean").glob("*.manifest.json")):
        manifest = read_manifest(shard_manifest)
        remove = manifest["config"]["remove"]
        for name, n in manifest["metrics"]["overlapping_docs"].items():
            overlapping[name] = overlapping.get(name, 0) + n
    return {"overlapping_docs": overlapping, "removed": remove}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Drop report", "", "| stage | docs in | docs out | kept % | MB in | MB out | dropped (reason: count) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in report["stages"]:
        kept = 100 * row["docs_out"] / row["docs_in"] if row["docs_in"] else 0.0
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(row["dropped"].items(), key=lambda kv: -kv[1])) or "none"
        lines.append(f"| {row['name']} | {row['docs_in']} | {row['docs_out']} | {kept:.1f} | "
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
    lines += ["", "## Languages in (fastText lid.176, top 15)", "", "| language | docs |", "| --- | ---: |"]
    lines += [f"| {lang} | {n} |" for lang, n in list(report["languages_in"].items())[:15]]
    return "\n".join(lines) + "\n"


def save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_funnel(report: dict[str, Any], path: Path) -> None:
    rows = report["stages"]
    labels = ["ingested records"] + [f"after {r['name']}" for r in rows]
    docs = [rows[0]["docs_in"]] + [r["docs_out"] for r in rows]
    mbytes = [rows[0]["bytes_in"] / 1e6] + [r["bytes_out"] / 1e6 for r in rows]
    fig, (ax_docs, ax_bytes) = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, values, unit in ((ax_docs, docs, "documents"), (ax_bytes, mbytes, "MB of text")):
        bars = ax.barh(labels[::-1], values[::-1], color="#4C72B0")
        ax.bar_label(bars, fmt="%.0f" if unit == "documents" else "%.2f", padding=3)
        ax.set_xlabel(unit)
        ax.margins(x=0.15)
    fig.suptitle("Web-data funnel")
    save_figure(fig, path)


def plot_reasons(report: dict[str, Any], path: Path) -> None:
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
    items = list(report["languages_in"].items())[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * max(len(items), 3) + 1))
    if items:
        bars = ax.barh([k for k, _ in items], [n for _, n in items], color="#55A868")
        ax.bar_label(bars, padding=3)
    ax.set_xlabel("documents (top language, before the langid filter)")
    ax.set_title(f"Language mix, top {top}")
    save_figure(fig, path)


def data_report(data: str | Path) -> dict[str, Any]:
    data = Path(data)
    report = build_report(data)
    atomic_write_json(data / "drop_report.json", report)
    atomic_write_text(data / "drop_report.md", markdown(report))
    plots = {name: data / "plots" / f"{name}.png" for name in ("funnel", "drop_reasons", "languages")}
    plot_funnel(report, plots["funnel"])
    plot_reasons(report, plots["drop_reasons"])
    plot_languages(report, plots["languages"])
    outputs = [data / "drop_report.json", data / "drop_report.md", *plots.values()]
    write_manifest(data / "manifest.json", stage="data_report", config={},
                   inputs=[data / folder / "manifest.json" for _, folder in STAGES] + [data / "dedup" / "manifest.json"],
                   outputs={p: None for p in outputs},
                   counts={r["name"]: {f: r[f] for f in ("docs_in", "docs_out")} for r in report["stages"]})
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="the run's data folder, e.g. results/sample/data")


def run(args: argparse.Namespace) -> int:
    report = data_report(args.data)
    for row in report["stages"]:
        log.info("%-8s %6d -> %6d  %s", row["name"], row["docs_in"], row["docs_out"], row["dropped"])
    return 0
