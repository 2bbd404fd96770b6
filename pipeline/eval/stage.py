"""eval: score every model of one size (pretrain, sft, grpo) side by side.

    python -m pipeline eval --model pretrain=results/sample/pretrain/tiny/final.pt \\
        --model sft=results/sample/sft/tiny/final.pt --tokens results/sample/tokens \\
        --tokenizer results/sample/tokenizer/tokenizer.json --out results/sample/eval/tiny --config '{...}'

For each model: val loss and bits per byte on the val shards (loss.py), MMLU acc and acc_norm
0-shot and k-shot (mmlu.py), and greedy pass@1 and sampled pass@k on the held-out splits of the
configured tasks (tasks.py). Writes into <out>: eval.json (everything, per MMLU subject too),
eval.md (the table: one row per model), eval.png (the same as bars), <model>/manifest.json (that
model's numbers, its final.pt as input) and manifest.json. The settings are the `eval` config
section (workflow/schemas/eval.schema.yaml); the tasks' own settings are the `tasks` section.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import atomic_path, atomic_write_json, atomic_write_text, check_inputs, write_manifest
from pipeline.cli import json_arg
from pipeline.config import section_config, workflow_path
from pipeline.eval.loss import val_loss_bpb
from pipeline.eval.mmlu import evaluate_mmlu
from pipeline.model.gpt import load_final
from pipeline.tokenizer.bpe import BPETokenizer

log = logging.getLogger(__name__)

MODEL_ORDER = ("pretrain", "sft", "grpo")  # table rows, in training order
ROW_NAMES = {"pretrain": "base", "sft": "SFT", "grpo": "GRPO"}


def evaluate_model(model: torch.nn.Module, tokenizer: BPETokenizer, cfg: dict[str, Any], tokens: Path,
                   tasks_config: dict[str, Any] | None) -> dict[str, Any]:
    """Every metric of one model, as one flat-ish dict (MMLU per shot count, tasks per name)."""
    torch.manual_seed(cfg["seed"])
    result: dict[str, Any] = val_loss_bpb(model, tokens, tokenizer, max_tokens=cfg["val_tokens"],
                                          batch_size=cfg["batch_size"])
    mmlu = cfg["mmlu"]
    result["mmlu"] = {f"{shots}-shot": evaluate_mmlu(model, tokenizer, workflow_path(mmlu["path"]), shots=shots,
                                                     max_questions=mmlu["max_questions"], batch_size=cfg["batch_size"])
                      for shots in mmlu["shots"]}
    result["tasks"] = {}
    if cfg["tasks"]["names"]:
        from pipeline.eval.tasks import task_accuracy
        from pipeline.tasks import get_task

        t = cfg["tasks"]
        for name in t["names"]:
            result["tasks"][name] = task_accuracy(
                model, tokenizer, get_task(name, tasks_config or {}), max_examples=t["max_examples"],
                samples=t["samples"], k=t["k"], temperature=t["temperature"],
                max_new_tokens=t["max_new_tokens"], seed=cfg["seed"])
    return result


def columns(results: dict[str, dict]) -> list[tuple[str, Any]]:
    """(header, getter) of every table column, from what the results hold."""
    first = next(iter(results.values()))
    cols: list[tuple[str, Any]] = [("val loss", lambda r: r["val_loss"]), ("bpb", lambda r: r["bpb"])]
    for shot in first["mmlu"]:
        for key in ("acc", "acc_norm"):
            cols.append((f"MMLU {shot} {key}", lambda r, s=shot, k=key: r["mmlu"][s][k]))
    for name, task in first["tasks"].items():
        cols.append((f"{name} pass@1", lambda r, n=name: r["tasks"][n]["pass@1"]))
        cols.append((f"{name} pass@{task['k']}", lambda r, n=name: r["tasks"][n]["pass@k"]))
    return cols


def table_md(results: dict[str, dict], size: str) -> str:
    cols = columns(results)
    first = next(iter(results.values()))
    lines = [f"# Eval: `{size}`\n",
             f"val loss: nats per token on {first['val_tokens']:,} val tokens; bpb: bits per UTF-8 byte of "
             f"the same text (special tokens excluded). MMLU: {next(iter(first['mmlu'].values()))['n']} test "
             f"questions, chance {next(iter(first['mmlu'].values()))['chance']:.2f}. Tasks: greedy pass@1 and "
             f"unbiased pass@k from n samples, on the held-out split.\n",
             "| model | " + " | ".join(h for h, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, r in results.items():
        lines.append(f"| {ROW_NAMES.get(name, name)} | " + " | ".join(f"{get(r):.3f}" for _, get in cols) + " |")
    for shot, summary in first["mmlu"].items():
        lines += ["", f"## MMLU {shot} per subject (acc)", "",
                  "| subject | n | " + " | ".join(ROW_NAMES.get(n, n) for n in results) + " |",
                  "|---|---:|" + "---:|" * len(results)]
        for subject, s in summary["subjects"].items():
            lines.append(f"| {subject} | {s['n']} | "
                         + " | ".join(f"{r['mmlu'][shot]['subjects'][subject]['acc']:.3f}" for r in results.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path, size: str) -> None:
    """One panel per column, one bar per model (MMLU panels with the chance line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(results)
    names = [ROW_NAMES.get(n, n) for n in results]
    per_row = 4
    rows = (len(cols) + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, per_row, figsize=(3.2 * per_row, 2.8 * rows), squeeze=False)
    for ax, (header, get) in zip(axes.flat, cols):
        values = [get(r) for r in results.values()]
        ax.bar(names, values, color=["tab:blue", "tab:orange", "tab:green"][:len(names)])
        if header.startswith("MMLU"):
            ax.axhline(next(iter(results.values()))["mmlu"][header.split()[1]]["chance"], color="gray",
                       linestyle="--", label="chance")
            ax.legend(fontsize=7)
        ax.set_title(header, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.suptitle(f"{size}: {' vs '.join(names)}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_eval(models: dict[str, Path], *, tokens: Path, tokenizer_path: Path, out: Path, size: str,
             cfg: dict[str, Any], tasks_config: dict[str, Any] | None = None) -> dict[str, dict]:
    check_inputs(*models.values(), tokenizer_path)  # every model before the first is scored
    tokenizer = BPETokenizer.load(tokenizer_path)
    ordered = sorted(models, key=lambda n: (MODEL_ORDER.index(n) if n in MODEL_ORDER else len(MODEL_ORDER), n))
    results: dict[str, dict] = {}
    for name in ordered:
        model, _ = load_final(models[name])
        log.info("evaluating %s (%s)", name, models[name])
        results[name] = evaluate_model(model, tokenizer, cfg, tokens, tasks_config)
        log.info("%s: val loss %.4f, bpb %.4f, %s", name, results[name]["val_loss"], results[name]["bpb"],
                 ", ".join(f"MMLU {s} acc {m['acc']:.3f}" for s, m in results[name]["mmlu"].items()))
        write_manifest(out / name / "manifest.json", stage="eval", config={"model": name, "size": size, **cfg},
                       inputs=[models[name]], outputs={}, metrics=results[name])
    atomic_write_json(out / "eval.json", {"size": size, "models": results})
    atomic_write_text(out / "eval.md", table_md(results, size))
    plot(results, out / "eval.png", size)
    inputs = [models[n] for n in ordered] + [tokenizer_path, tokens / "manifest.json"]
    write_manifest(out / "manifest.json", stage="eval", config={"size": size, **cfg}, inputs=inputs,
                   outputs={out / f: None for f in ("eval.json", "eval.md", "eval.png")}
                   | {out / n / "manifest.json": None for n in ordered},
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
             cfg=section_config("eval", args.config), tasks_config=args.tasks_config)
    return 0
