"""eval: score every model of one size (pretrain, sft, grpo) side by side.

    python -m pipeline eval --model pretrain=results/sample/pretrain/tiny/final.pt \\
        --model sft=results/sample/sft/tiny/final.pt --tokens results/sample/tokens \\
        --tokenizer results/sample/tokenizer/tokenizer.json --out results/sample/eval/tiny --config '{...}'

For each model: val loss and bits per byte on the val shards, overall and per source (loss.py),
MMLU acc and acc_norm 0-shot and k-shot (mmlu.py), and greedy pass@1 and sampled pass@k on the
fixed held-out items of the configured tasks (tasks.py), each with its 95% interval (stats.py).
Then every pair of models is compared on the same documents and items (paired bootstrap, exact
McNemar), and each later model's change of val loss vs the first is its forgetting. Writes into
<out>: eval.json (everything, per MMLU subject too), eval.md (the tables), eval.png (the same as
bars with error bars), <model>/manifest.json (that model's numbers, its final.pt as input) and
manifest.json (with the held-out items' record: count, seed, sha256). The settings are the `eval`
config section (workflow/schemas/eval.schema.yaml); the tasks' own settings, their held-out items
included, are the `tasks` section.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import atomic_write_json, atomic_write_text, check_inputs, write_manifest
from pipeline.cli import json_arg
from pipeline.config import section_config, workflow_path
from pipeline.eval.loss import DocumentScores, val_document_scores
from pipeline.eval.mmlu import evaluate_mmlu
from pipeline.eval.tasks import task_accuracy
from pipeline.figures import pyplot, save_figure
from pipeline.model.gpt import load_final
from pipeline.stats import MIN_BOOTSTRAP_UNITS, compare_correct, compare_values, fmt
from pipeline.tasks import get_task, held_out_record
from pipeline.tokenizer.bpe import BPETokenizer

log = logging.getLogger(__name__)

MODEL_ORDER = ("pretrain", "sft", "grpo")  # table rows, in training order
ROW_NAMES = {"pretrain": "base", "sft": "SFT", "grpo": "GRPO"}
NOT_MEASURED = "not measured at this scale"


def evaluate_model(model: torch.nn.Module, tokenizer: BPETokenizer, cfg: dict[str, Any], tokens: Path,
                   tasks_config: dict[str, Any] | None,
                   text_sources: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every metric of one model (val loss and bpb overall and per source, MMLU per shot count,
    tasks per name), and the per-unit scores the paired comparisons read: documents' sums per
    source, MMLU right/wrong per question, task scores per item."""
    torch.manual_seed(cfg["seed"])
    documents = val_document_scores(model, tokens, tokenizer, max_tokens=cfg["val_tokens"],
                                    batch_size=cfg["batch_size"], text_sources=text_sources)
    result: dict[str, Any] = {**DocumentScores.concat(list(documents.values())).summary(),
                              "by_source": {source: d.summary() for source, d in documents.items()}}
    units: dict[str, Any] = {"documents": documents, "mmlu": {}, "tasks": {}}
    mmlu = cfg["mmlu"]
    result["mmlu"] = {}
    for shots in mmlu["shots"]:
        summary, answers = evaluate_mmlu(model, tokenizer, workflow_path(mmlu["path"]), shots=shots,
                                         max_questions=mmlu["max_questions"], batch_size=cfg["batch_size"])
        result["mmlu"][f"{shots}-shot"] = summary
        units["mmlu"][f"{shots}-shot"] = [int(a["acc"]) for a in answers]
    result["tasks"] = {}
    t = cfg["tasks"]
    for name in t["names"]:
        result["tasks"][name], units["tasks"][name] = task_accuracy(
            model, tokenizer, get_task(name, tasks_config or {}), max_examples=t["max_examples"],
            sample_items=t["sample_items"], samples=t["samples"], k=t["k"], temperature=t["temperature"],
            seed=cfg["seed"])
    return result, units


def lm_comparisons(a: str, b: str, units: dict[str, dict]) -> dict[str, Any]:
    """val loss and bpb of b vs a (b - a), overall and per source, paired over documents."""
    def pair(docs_a: DocumentScores, docs_b: DocumentScores) -> dict[str, Any]:
        return {"val_loss": compare_values(a, docs_a.nats, b, docs_b.nats, docs_a.tokens),
                "bpb": compare_values(a, docs_a.text_nats / math.log(2), b, docs_b.text_nats / math.log(2),
                                      docs_a.bytes)}

    da, db = units[a]["documents"], units[b]["documents"]
    return {**pair(DocumentScores.concat(list(da.values())), DocumentScores.concat(list(db.values()))),
            "by_source": {source: pair(da[source], db[source]) for source in da}}


def comparisons(names: list[str], results: dict[str, dict], units: dict[str, dict]) -> list[dict[str, Any]]:
    """Every pair of models in training order (a before b), each metric paired on the same
    units: val loss and bpb over documents (paired bootstrap), MMLU acc and task pass@1 over
    items (exact McNemar), pass@k over items (paired bootstrap)."""
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            lm = lm_comparisons(a, b, units)
            rows = [("val loss", lm["val_loss"]), ("bpb", lm["bpb"])]
            rows += [(f"{source} {key}", lm["by_source"][source][key])
                     for source in lm["by_source"] for key in ("val_loss", "bpb")]
            rows += [(f"MMLU {shot} acc", compare_correct(a, units[a]["mmlu"][shot], b, units[b]["mmlu"][shot]))
                     for shot in units[a]["mmlu"]]
            for task, scores in units[a]["tasks"].items():
                k = results[a]["tasks"][task]["k"]
                rows.append((f"{task} pass@1", compare_correct(a, scores["correct"], b, units[b]["tasks"][task]["correct"])))
                rows.append((f"{task} pass@{k}", compare_values(a, scores["pass@k"], b, units[b]["tasks"][task]["pass@k"])))
            out += [{"metric": metric.replace("val_loss", "val loss"), **c} for metric, c in rows]
    return out


def task_measured(results: dict[str, dict]) -> dict[str, bool]:
    """A task is measured when some model gets an item right (greedy or sampled); at 0 for every
    model the scale is too small to say anything about the task."""
    first = next(iter(results.values()))
    return {task: any(r["tasks"][task]["pass@1"]["value"] > 0 or r["tasks"][task]["pass@k"]["value"] > 0
                      for r in results.values()) for task in first["tasks"]}


def row_name(name: str) -> str:
    return ROW_NAMES.get(name, name)


def change(c: dict[str, Any]) -> str:
    """A comparison as '+0.123 [+0.100, +0.150]' ('+0.387 (n 2)' without an interval)."""
    if c["ci95"] is None:
        return f"{c['diff']:+.3f} (n {c['n']})"
    return f"{c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"


def table_md(results: dict[str, dict], comparisons: list[dict], items: dict[str, dict], size: str) -> str:
    first = next(iter(results.values()))
    sources = list(first["by_source"])
    base = next(iter(results))
    total = sum(first["by_source"][s]["tokens"] for s in sources)
    mix = ", ".join(f"{s} {first['by_source'][s]['documents']} documents / {first['by_source'][s]['tokens']:,} tokens "
                    f"({first['by_source'][s]['tokens'] / total:.0%})" for s in sources)
    lines = [f"# Eval: `{size}`\n",
             "Every number with its 95% interval: Wilson for accuracies, bootstrap over documents for val loss "
             "and bpb, over items for pass@k. Comparisons are paired on the same documents or items. A bootstrap "
             f"over fewer than {MIN_BOOTSTRAP_UNITS} units gives no interval: the value is shown with its n.\n",
             "## Language modelling\n",
             f"Held-out text of the tokens' val split, scored per source: {mix}. val loss: nats per token; bpb: "
             f"bits per UTF-8 byte (special tokens excluded). Δ: the change vs {row_name(base)} (forgetting when "
             "positive), paired over documents.\n"]
    groups = [("all", lambda r: r)] + [(s, lambda r, s=s: r["by_source"][s]) for s in sources]
    header = ["model"]
    for g, _ in groups:
        header += [f"{g} val loss", f"{g} Δ"]
    header += [f"{g} bpb" for g, _ in groups]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, r in results.items():
        cells = [row_name(name)]
        for g, get in groups:
            forgetting = r.get("forgetting")
            f = forgetting if g == "all" else (forgetting or {}).get("by_source", {}).get(g)
            cells += [fmt(get(r)["val_loss"]), change(f["val_loss"]) if f else "-"]
        cells += [fmt(get(r)["bpb"]) for _, get in groups]
        lines.append("| " + " | ".join(cells) + " |")

    measured = task_measured(results)
    shots = list(first["mmlu"])
    lines += ["", "## MMLU and tasks\n",
              f"MMLU: {first['mmlu'][shots[0]]['n'] if shots else 0} test questions, chance 0.25 (acc_norm equals "
              f"acc with letter choices; both in eval.json). Tasks: greedy pass@1 and unbiased pass@k from n samples "
              f"on each task's fixed held-out items ("
              + ", ".join(f"{t}: {rec['items']} items, seed {rec['seed']}, sha256 {rec['sha256'][:12]}"
                          for t, rec in items.items()) + ").\n"]
    cols = [(f"MMLU {shot} acc", lambda r, s=shot: r["mmlu"][s]["acc"]) for shot in shots]
    for task, t in first["tasks"].items():
        if measured[task]:
            cols += [(f"{task} pass@1", lambda r, n=task: r["tasks"][n]["pass@1"]),
                     (f"{task} pass@{t['k']}", lambda r, n=task: r["tasks"][n]["pass@k"])]
    if cols:
        lines += ["| model | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {row_name(name)} | " + " | ".join(fmt(get(r)) for _, get in cols) + " |"
                  for name, r in results.items()]
    for task in (t for t, m in measured.items() if not m):
        t = first["tasks"][task]
        lines.append(f"\n{task}: {NOT_MEASURED} (0 for every model: pass@1 on {t['pass@1']['n']} items, "
                     f"pass@{t['k']} on {t['pass@k']['n']}).")

    lines += ["", "## Paired comparisons\n",
              "diff = b - a with its 95% interval; p: exact McNemar for pass@1 and MMLU acc, paired bootstrap "
              "otherwise.\n", "| metric | a → b | diff [95% CI] | p | test | n |", "|---|---|---:|---:|---|---:|"]
    for c in comparisons:
        if c["metric"].split()[0] in measured and not measured[c["metric"].split()[0]]:
            continue
        lines.append(f"| {c['metric']} | {row_name(c['a'])} → {row_name(c['b'])} | {change(c)} | "
                     f"{'-' if c['p_value'] is None else format(c['p_value'], '.3g')} | {c['test']} | {c['n']} |")
    for shot, summary in first["mmlu"].items():
        lines += ["", f"## MMLU {shot} per subject (acc)", "",
                  "| subject | n | " + " | ".join(row_name(n) for n in results) + " |",
                  "|---|---:|" + "---:|" * len(results)]
        for subject, s in summary["subjects"].items():
            lines.append(f"| {subject} | {s['n']} | "
                         + " | ".join(fmt(r["mmlu"][shot]["subjects"][subject]["acc"]) for r in results.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path, size: str) -> None:
    """Bars with 95% error bars: val loss and bpb per source, MMLU acc per shot (chance dashed),
    each task's pass@1 and pass@k; a task at 0 for every model says so instead of empty bars."""
    plt = pyplot()
    import numpy as np

    first = next(iter(results.values()))
    names = [row_name(n) for n in results]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    measured = task_measured(results)
    sources = ["all"] + list(first["by_source"])
    get_source = lambda r, s: r if s == "all" else r["by_source"][s]  # noqa: E731
    panels: list[tuple[str, list[str], Any]] = [
        ("val loss (nats/token)", sources, lambda r, s: get_source(r, s)["val_loss"]),
        ("bits per byte", sources, lambda r, s: get_source(r, s)["bpb"]),
        ("MMLU acc", list(first["mmlu"]), lambda r, s: r["mmlu"][s]["acc"])]
    for task, t in first["tasks"].items():
        panels.append((f"{task} (held-out, {t['n']} items)", ["pass@1", f"pass@{t['k']}"] if measured[task] else [],
                       lambda r, s, n=task: r["tasks"][n]["pass@1" if s == "pass@1" else "pass@k"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, groups, get) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=9)
        if not groups:  # zero for every model: an empty panel would read as a measurement
            ax.text(0.5, 0.5, f"{NOT_MEASURED}:\n0 for every model", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="dimgray")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        width = 0.8 / len(results)
        x = np.arange(len(groups))
        for i, (label, r) in enumerate(zip(names, results.values())):
            metrics = [get(r, g) for g in groups]
            values = np.array([m["value"] for m in metrics])
            errors = np.array([[m["value"] - m["ci95"][0], m["ci95"][1] - m["value"]] if m["ci95"] else [0.0, 0.0]
                               for m in metrics]).T  # no bar where there are too few units for an interval
            ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=label,
                   color=colors[i % len(colors)])
        ax.set_xticks(x, groups, fontsize=8)
        if title == "MMLU acc":
            ax.axhline(first["mmlu"][groups[0]]["chance"], color="gray", linestyle="--", label="chance")
        ax.grid(alpha=0.3, axis="y")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{size}: {' vs '.join(names)} (bars: 95% intervals)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def run_eval(models: dict[str, Path], *, tokens: Path, tokenizer_path: Path, out: Path, size: str,
             cfg: dict[str, Any], tasks_config: dict[str, Any] | None = None,
             text_sources: Collection[str] = ()) -> dict[str, dict]:
    check_inputs(*models.values(), tokenizer_path)  # every model before the first is scored
    tokenizer = BPETokenizer.load(tokenizer_path)
    ordered = sorted(models, key=lambda n: (MODEL_ORDER.index(n) if n in MODEL_ORDER else len(MODEL_ORDER), n))
    items = {name: held_out_record(get_task(name, tasks_config or {}), cfg["tasks"]["max_examples"])
             for name in cfg["tasks"]["names"]}
    results: dict[str, dict] = {}
    units: dict[str, dict] = {}
    for name in ordered:
        model, _ = load_final(models[name])
        log.info("evaluating %s (%s)", name, models[name])
        results[name], units[name] = evaluate_model(model, tokenizer, cfg, tokens, tasks_config, text_sources)
        log.info("%s: val loss %s, bpb %s, %s", name, fmt(results[name]["val_loss"]), fmt(results[name]["bpb"]),
                 ", ".join(f"MMLU {s} acc {fmt(m['acc'])}" for s, m in results[name]["mmlu"].items()))
    base = ordered[0]
    for name in ordered[1:]:  # forgetting: the change of the language model vs the first (base) model
        results[name]["forgetting"] = lm_comparisons(base, name, units)
    measured = task_measured(results)
    for r in results.values():
        for task, scores in r["tasks"].items():
            scores["measured"] = measured[task]
    paired = comparisons(ordered, results, units)
    for name in ordered:
        write_manifest(out / name / "manifest.json", stage="eval", config={"model": name, "size": size, **cfg},
                       inputs=[models[name]], outputs={}, counts={"held_out_items": items}, metrics=results[name])
    atomic_write_json(out / "eval.json", {"size": size, "held_out_items": items,
                                          "tasks": {t: {"measured": m} | ({} if m else {"note": NOT_MEASURED})
                                                    for t, m in measured.items()},
                                          "models": results, "comparisons": paired})
    atomic_write_text(out / "eval.md", table_md(results, paired, items, size))
    plot(results, out / "eval.png", size)
    inputs = [models[n] for n in ordered] + [tokenizer_path, tokens / "manifest.json"]
    write_manifest(out / "manifest.json", stage="eval", config={"size": size, **cfg},
                   inputs=inputs,
                   outputs={out / f: None for f in ("eval.json", "eval.md", "eval.png")}
                   | {out / n / "manifest.json": None for n in ordered},
                   counts={"held_out_items": items},
                   metrics={n: {k: v for k, v in r.items() if k in ("val_loss", "bpb")} for n, r in results.items()})
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FINAL_PT",
                        help="a model to evaluate, e.g. pretrain=results/sample/pretrain/tiny/final.pt (repeat)")
    parser.add_argument("--tokens", required=True, type=Path, help="the tokens folder (manifest.json, val/)")
    parser.add_argument("--tokenizer", required=True, type=Path, help="the tokenizer.json the models use")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    parser.add_argument("--size", default="", help="the model size, for titles")
    parser.add_argument("--config", type=json_arg, default={}, help="the eval config section as JSON (or @file.yaml)")
    parser.add_argument("--tasks-config", type=json_arg, default={}, help="the tasks config section as JSON")
    parser.add_argument("--text-sources", nargs="*", default=[], metavar="NAME",
                        help="val sources that are text corpora (inputs.text), scored each on its own; the rest "
                             "are web shards, scored together as 'web'")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the rule's threads:); small models score fastest on one")


def run(args: argparse.Namespace) -> int:
    models = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model {spec!r}: expected NAME=PATH, e.g. pretrain=final.pt")
        models[name] = Path(path)
    torch.set_num_threads(args.threads)
    run_eval(models, tokens=args.tokens, tokenizer_path=args.tokenizer, out=args.out, size=args.size,
             cfg=section_config("eval", args.config), tasks_config=args.tasks_config, text_sources=args.text_sources)
    return 0
