"""GRPO: held-out arithmetic accuracy of base < SFT < GRPO, GRPO's gain over 3 seeds, and the loss
reductions side by side.

It runs the real GRPO stage (`pipeline.train.grpo_stage.train`) from an SFT final.pt once per
(loss type, seed), with the `grpo` and `tasks` sections of config.yaml (or --configfile) and the
overrides on top, and scores the pretrained base with the same evaluator on the same first
`accuracy_examples` held-out problems (greedy, exact answer). It prints, and writes into
docs/benchmarks.md, one row per run (SFT and GRPO accuracy, gain, final train reward, wall time,
rollout tokens/s) and per loss type the gain's mean and std over the seeds.

    the default run (after `snakemake --cores 2 results/sample/sft/tiny/final.pt`):
        python -m benchmarks.bench_grpo --base results/sample/pretrain/tiny/final.pt \\
            --model results/sample/sft/tiny/final.pt --tokenizer results/sample/tokenizer/tokenizer.json
    fewer runs:  ... --seeds 1337 --loss-types dapo
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_section
from pipeline.config import load_config
from pipeline.model.gpt import load_final
from pipeline.tasks import get_task
from pipeline.tasks.evaluate import greedy_accuracy
from pipeline.tokenizer import BPETokenizer
from pipeline.train.grpo_stage import fitting_prompts, train

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, type=Path, help="the pretrained final.pt (scored, not trained)")
    parser.add_argument("--model", required=True, type=Path, help="the SFT final.pt GRPO starts from")
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--configfile", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--loss-types", nargs="+", default=["dapo", "grpo", "dr_grpo"])
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = load_config(args.configfile)
    cfg, tasks_config = config["grpo"], config["tasks"]
    cfg["wandb_mode"] = "disabled"
    tokenizer = BPETokenizer.load(args.tokenizer)
    task = get_task(cfg["task"], tasks_config)
    base, meta = load_final(args.base)
    held_out, _ = fitting_prompts(tokenizer, task.examples("test"), meta["model_config"]["seq_len"],
                                  cfg["max_completion_tokens"])
    n = cfg["accuracy_examples"]
    base_accuracy = greedy_accuracy(base, tokenizer, task, [e for _, e in held_out[:n]],
                                    max_new_tokens=cfg["max_completion_tokens"])["accuracy"]

    rows, gains = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for loss_type in args.loss_types:
            for seed in args.seeds:
                run_cfg = {**cfg, "loss_type": loss_type, "seed": seed}
                t0 = time.perf_counter()
                summary = train(run_cfg, model_path=args.model, tokenizer_path=args.tokenizer,
                                out=Path(tmp) / f"{loss_type}-{seed}", tasks_config=tasks_config)
                wall = time.perf_counter() - t0
                m = summary["metrics"]
                sft, grpo = m[f"{task.name}_accuracy_input"], m[f"{task.name}_accuracy"]
                gains.setdefault(loss_type, []).append(grpo - sft)
                rows.append(f"| {loss_type} | {seed} | {sft:.1%} | {grpo:.1%} | {100 * (grpo - sft):+.1f} | "
                            f"{m['final_reward_mean']:.3f} | {wall:.0f} | {m['rollout_tokens_per_s']:.0f} |")
                print(rows[-1], flush=True)

    summary_rows = [f"| {lt} | {len(g)} | {100 * statistics.mean(g):+.1f} | "
                    f"{100 * statistics.stdev(g) if len(g) > 1 else float('nan'):.1f} |" for lt, g in gains.items()]
    command = ("python -m benchmarks.bench_grpo --base " + str(args.base) + " --model " + str(args.model)
               + " --tokenizer " + str(args.tokenizer)
               + (" --seeds " + " ".join(map(str, args.seeds)) if args.seeds != [1337, 1338, 1339] else "")
               + (" --loss-types " + " ".join(args.loss_types) if args.loss_types != ["dapo", "grpo", "dr_grpo"] else ""))
    body = "\n".join([
        f"`{command}` on {machine()}; the `grpo` section of {args.configfile.name} ({cfg['max_steps']} steps of "
        f"{cfg['prompts_per_step']} x {cfg['group_size']} rollouts), each loss type and seed a whole stage run.",
        "",
        f"Held-out {task.name} accuracy, greedy, exact answer, the same first {n} held-out problems for every "
        f"model: pretrained base **{base_accuracy:.1%}**.",
        "",
        "| loss type | seed | SFT | GRPO | gain (points) | final train reward | wall s | rollout tok/s |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "| loss type | seeds | mean gain (points) | std |", "|---|---|---|---|", *summary_rows])
    print(body)
    if not args.no_doc:
        write_section("GRPO", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
