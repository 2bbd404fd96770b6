"""GRPO's rollouts and the GRPO stage's cost, between two source trees: rollout tokens/s, rollout
seconds, and the stage's wall and CPU time, each run a whole `python -m pipeline grpo` process on
the same SFT model with the same config (the schema's defaults), the trees interleaved run by run
so both see the same load. Prints, and writes into docs/benchmarks.md, one row per run and the
medians' ratios.

    the rollout loop of commit 0854fc6 (one prompt at a time on the model's KV cache) against the
    inference engine (this tree):
        git archive 0854fc6 | tar -x -C /tmp/loop
        python -m benchmarks.bench_grpo_rollouts --model results/sample/sft/tiny/final.pt \\
            --tokenizer results/sample/tokenizer/tokenizer.json --tree loop=/tmp/loop --tree engine=. --repeats 3

A tree is a checkout whose `pipeline` package is run (PYTHONPATH and working directory); both use
this interpreter. The model and tokenizer are checked against their manifests by the stage, so
copy each with the manifest.json beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, write_section


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(tree: Path, model: Path, tokenizer: Path, out: Path, config: dict) -> dict:
    """One GRPO stage run in `tree`; its wall and CPU seconds and its rollout figures."""
    command = [sys.executable, "-m", "pipeline", "grpo", "--model", str(model.resolve()),
               "--tokenizer", str(tokenizer.resolve()), "--out", str(out), "--config", json.dumps(config)]
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    cpu, start = cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: grpo exited {done.returncode}: {done.stderr[-3000:]}")
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "rollout_s" in r]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    return {"wall_s": wall, "cpu_s": cpu, "rollout_s": sum(r["rollout_s"] for r in steps),
            "rollout_tokens_per_s": metrics["rollout_tokens_per_s"], "steps": len(steps)}


def paired_gain(before: list[bool], after: list[bool], resamples: int = 10_000, seed: int = 0) -> dict:
    """after - before accuracy on the same items: the difference, its 95% interval (bootstrap over
    items) and the exact McNemar p-value (a binomial test on the items the two disagree on)."""
    from scipy.stats import binomtest

    b, a = np.array(before, dtype=float), np.array(after, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = (a[idx] - b[idx]).mean(axis=1)
    gained, lost = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {"diff": float(a.mean() - b.mean()), "low": float(np.percentile(diffs, 2.5)),
            "high": float(np.percentile(diffs, 97.5)), "p": float(p), "gained": gained, "lost": lost}


def score(model_path: Path, tokenizer_path: Path, n: int, config: dict) -> tuple[str, list[bool]]:
    """Greedy correctness of `model_path` on the first n held-out problems of GRPO's task that
    leave room for a completion (the stage's own filter)."""
    from pipeline.config import section_config
    from pipeline.model.gpt import load_final
    from pipeline.tasks import get_task
    from pipeline.tasks.evaluate import greedy_accuracy
    from pipeline.tokenizer import BPETokenizer
    from pipeline.train.grpo import fitting_prompts

    cfg, tokenizer = section_config("grpo", config), BPETokenizer.load(tokenizer_path)
    model, meta = load_final(model_path)
    task = get_task(cfg["task"], section_config("tasks", {}))
    held_out, _ = fitting_prompts(tokenizer, task.examples("test"), meta["model_config"]["seq_len"],
                                  cfg["max_completion_tokens"])
    result = greedy_accuracy(model, tokenizer, task, [e for _, e in held_out[:n]],
                             max_new_tokens=cfg["max_completion_tokens"])
    return task.name, [a["correct"] for a in result["answers"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="the SFT final.pt GRPO starts from")
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (twice or more)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", type=json.loads, default={}, help="grpo config overrides (JSON)")
    parser.add_argument("--problems", type=int, default=500,
                        help="held-out problems the SFT model and each tree's first GRPO model are scored on")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    config = {"wandb_mode": "disabled", **args.config}

    rows: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, tree in trees.items():
                r = run(Path(tree), args.model, args.tokenizer, Path(tmp) / f"{name}-{repeat}", config)
                rows[name].append(r)
                print(f"{name} run {repeat + 1}: wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, rollouts "
                      f"{r['rollout_s']:.1f} s, {r['rollout_tokens_per_s']:.0f} tok/s (median step)", flush=True)
        task, sft = score(args.model, args.tokenizer, args.problems, config)
        gains = {name: paired_gain(sft, score(Path(tmp) / f"{name}-0" / "final.pt", args.tokenizer, args.problems,
                                              config)[1]) for name in trees}

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    names = list(trees)
    lines = ["| tree | run | rollout tok/s (median step) | rollout s (all steps) | stage wall s | stage CPU s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for repeat in range(args.repeats):
        for name in names:
            r = rows[name][repeat]
            lines.append(f"| {name} | {repeat + 1} | {r['rollout_tokens_per_s']:.0f} | {r['rollout_s']:.1f} | "
                         f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    base = names[0]
    ratios = [f"- {name} / {base}, medians over the runs: rollout tokens/s **{median(name, 'rollout_tokens_per_s') / median(base, 'rollout_tokens_per_s'):.2f}x**, "
              f"rollout seconds {median(name, 'rollout_s') / median(base, 'rollout_s'):.2f}x, stage wall "
              f"{median(name, 'wall_s') / median(base, 'wall_s'):.2f}x, stage CPU {median(name, 'cpu_s') / median(base, 'cpu_s'):.2f}x"
              for name in names[1:]]
    accuracy = [f"- GRPO's gain over the SFT model, {name} (its first run, scored greedily on the same first "
                f"{len(sft)} held-out {task} problems, SFT {sum(sft) / len(sft):.1%}): "
                f"**{g['diff']:+.1%}** (95% interval {g['low']:+.1%} to {g['high']:+.1%}, bootstrap over problems; "
                f"{g['gained']} problems gained, {g['lost']} lost, exact McNemar p = {g['p']:.3f})"
                for name, g in gains.items()]
    command = (f"python -m benchmarks.bench_grpo_rollouts --model {args.model} --tokenizer {args.tokenizer} "
               + " ".join(f"--tree {t}" for t in args.tree) + f" --repeats {args.repeats}"
               + (f" --config '{json.dumps(args.config)}'" if args.config else ""))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    body = "\n".join([f"Command: `{command}`  ",
                      f"Machine: {machine()}; load average {load} at the end (a shared machine: read the ratios, "
                      "the runs were interleaved).", "",
                      f"The `grpo` section's defaults with {config}, each run a whole stage process.", "",
                      *lines, "", *ratios, *accuracy])
    print(body)
    if not args.no_doc:
        write_section("GRPO rollouts: " + " vs ".join(names), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
