"""GRPO's gain over SFT, measured paired: every GRPO run and the SFT model it started from answer
the same fixed held-out items, and the gain is read item by item.

It runs the real GRPO stage (`pipeline.train.grpo.train`) from an SFT final.pt once per
(loss type, seed), with the `grpo` and `tasks` sections of config.yaml (or --configfile), and
scores the SFT model and each GRPO model with `held_out_accuracy`: greedy, exact answer, on the
task's fixed held-out items (`tasks.<task>.held_out`, the items SFT's, GRPO's and eval's numbers
come from). Per run: both accuracies with Wilson intervals, the gain with its paired bootstrap
interval and the exact McNemar p-value. Per loss type, over the seeds: the mean gain with a 95%
interval over items (each item's gain averaged over the seeds, resampled; the variation of the
test items given these runs) and a t interval over seeds (the variation from run to run). It
prints, writes the `GRPO` section of docs/benchmarks.md and, with --json, every figure.

    the default run (after `snakemake --cores 2 results/sample/sft/tiny/final.pt`):
        python -m benchmarks.bench_grpo --model results/sample/sft/tiny/final.pt \\
            --tokenizer results/sample/tokenizer/tokenizer.json --base results/sample/pretrain/tiny/final.pt
    fewer runs:  ... --seeds 1337 1338 1339 --loss-types dapo
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, write_section
from pipeline.artifacts import atomic_write_json
from pipeline.config import load_config
from pipeline.model.gpt import load_final
from pipeline.stats import compare_correct, fmt, paired_bootstrap, t_interval
from pipeline.tasks import get_task, held_out_record
from pipeline.tasks.evaluate import held_out_accuracy
from pipeline.tokenizer import BPETokenizer
from pipeline.train.grpo import train

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [1337, 1338, 1339, 1340, 1341]
LOSS_TYPES = ["dapo"]


def points(c: dict[str, Any]) -> str:
    return f"{100 * c['diff']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"


def over_seeds(sft: list[int], runs: list[list[int]]) -> dict[str, Any]:
    """The mean gain over runs (seeds) of the same item list: its interval over items (each item's
    gain averaged over the runs, paired bootstrap) and over runs (t interval of the per-run gains)."""
    mean_run = np.mean(np.asarray(runs, dtype=float), axis=0)
    diff, items_ci, p = paired_bootstrap(np.asarray(sft, dtype=float), mean_run)
    gains = [float(np.mean(r)) - float(np.mean(sft)) for r in runs]
    return {"seeds": len(runs), "mean_gain": diff, "ci95_items": items_ci, "p_value_items": p,
            "ci95_seeds": t_interval(gains) if len(gains) > 1 else None, "gains": gains}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="the SFT final.pt GRPO starts from")
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--base", type=Path, help="the pretrained final.pt, scored too (not trained)")
    parser.add_argument("--configfile", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--loss-types", nargs="+", default=LOSS_TYPES, choices=["dapo", "grpo", "dr_grpo"])
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = load_config(args.configfile)
    cfg, tasks_config = config["grpo"], config["tasks"]
    # the stage's own end-of-run scoring is skipped: this script scores every model once, the same way
    cfg.update(wandb_mode="disabled", accuracy_examples=0)
    tokenizer = BPETokenizer.load(args.tokenizer)
    task = get_task(cfg["task"], tasks_config)
    record = held_out_record(task)
    sft = held_out_accuracy(load_final(args.model)[0], tokenizer, task)
    base = held_out_accuracy(load_final(args.base)[0], tokenizer, task) if args.base else None

    runs: list[dict[str, Any]] = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for loss_type in args.loss_types:
            for seed in args.seeds:
                out = Path(tmp) / f"{loss_type}-{seed}"
                t0 = time.perf_counter()
                summary = train({**cfg, "loss_type": loss_type, "seed": seed}, model_path=args.model,
                                tokenizer_path=args.tokenizer, out=out, tasks_config=tasks_config)
                wall = time.perf_counter() - t0
                grpo = held_out_accuracy(load_final(out / "final.pt")[0], tokenizer, task)
                c = compare_correct("sft", sft["correct"], "grpo", grpo["correct"])
                only_sft = sum(a and not b for a, b in zip(sft["correct"], grpo["correct"]))
                only_grpo = sum(b and not a for a, b in zip(sft["correct"], grpo["correct"]))
                runs.append({"loss_type": loss_type, "seed": seed, "accuracy": grpo["accuracy"], "comparison": c,
                             "only_sft": only_sft, "only_grpo": only_grpo, "correct": grpo["correct"],
                             "final_reward_mean": summary["metrics"]["final_reward_mean"], "wall_s": wall})
                rows.append(f"| {loss_type} | {seed} | {fmt(grpo['accuracy'], 1, 100)} | {points(c)} | "
                            f"{only_sft} / {only_grpo} | {c['p_value']:.3g} | "
                            f"{summary['metrics']['final_reward_mean']:.3f} | {wall:.0f} |")
                print(rows[-1], flush=True)

    summaries = {lt: over_seeds(sft["correct"], [r["correct"] for r in runs if r["loss_type"] == lt])
                 for lt in args.loss_types}
    summary_rows = []
    for lt, s in summaries.items():
        seeds_ci = (f"[{100 * s['ci95_seeds'][0]:+.1f}, {100 * s['ci95_seeds'][1]:+.1f}]"
                    if s["ci95_seeds"] else "-")
        significant = sum(r["comparison"]["p_value"] < 0.05 and r["comparison"]["diff"] > 0
                          for r in runs if r["loss_type"] == lt)
        summary_rows.append(f"| {lt} | {s['seeds']} | **{100 * s['mean_gain']:+.1f}** | "
                            f"[{100 * s['ci95_items'][0]:+.1f}, {100 * s['ci95_items'][1]:+.1f}] | "
                            f"{s['p_value_items']:.3g} | {seeds_ci} | {significant} of {s['seeds']} |")
    command = (f"python -m benchmarks.bench_grpo --model {args.model} --tokenizer {args.tokenizer}"
               + (f" --base {args.base}" if args.base else "")
               + (f" --configfile {args.configfile}" if args.configfile != ROOT / "config.yaml" else "")
               + (" --seeds " + " ".join(map(str, args.seeds)) if args.seeds != SEEDS else "")
               + (" --loss-types " + " ".join(args.loss_types) if args.loss_types != LOSS_TYPES else ""))
    base_text = f"pretrained base {fmt(base['accuracy'], 1, 100)}%, " if base else ""
    body = "\n".join([
        f"`{command}` on {machine()}; the `grpo` section of {args.configfile.name} ({cfg['max_steps']} steps of "
        f"{cfg['prompts_per_step']} x {cfg['group_size']} rollouts), each loss type and seed a whole stage run.",
        "",
        f"Held-out {task.name} accuracy, greedy, exact answer, on the task's {record['items']} fixed held-out items "
        f"(seed {record['seed']}, sha256 {record['sha256'][:12]}; the items SFT, GRPO and eval report on), 95% "
        f"intervals: {base_text}SFT **{fmt(sft['accuracy'], 1, 100)}%**.",
        "",
        "| loss type | seed | GRPO (%) | gain over SFT (points, paired 95% CI) | items only SFT / only GRPO got "
        "right | McNemar p | final train reward | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Over the seeds: the mean gain; its 95% interval over items (each item's gain averaged over the seeds, "
        "paired bootstrap: how much the figure would move on other test items, given these runs) and its p-value; "
        "the t interval over seeds (how much it moves from run to run); runs with a significant gain "
        "(McNemar p < 0.05).",
        "",
        "| loss type | seeds | mean gain (points) | 95% CI over items | p (items) | 95% CI over seeds | "
        "significant runs |",
        "|---|---:|---:|---:|---:|---:|---:|", *summary_rows])
    print(body)
    if args.json:
        atomic_write_json(args.json, {"command": command, "held_out_items": record, "sft": sft["accuracy"],
                                      "base": base["accuracy"] if base else None,
                                      "runs": [{k: v for k, v in r.items() if k != "correct"} for r in runs],
                                      "over_seeds": summaries})
    if not args.no_doc:
        write_section("GRPO", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
