"""SFT: held-out arithmetic accuracy of the pretrained base vs the SFT model, the language model
kept (val loss vs the base's), wall and CPU time, tokens/s.

It runs the real SFT stage (`pipeline.train.sft.train`) once per variant on a pretrained final.pt,
with the `sft` and `tasks` sections of config.yaml (or --configfile) and the variant's overrides on
top, and prints one table row per variant: the base's and the SFT model's held-out arithmetic
accuracy (greedy, exact answer), the val loss of the SFT model on the tokenize stage's val split
(`val_loss_bpb`, the eval stage's measure, over eval.val_tokens) as a ratio to the base's, its bits
per byte, the held-out loss per trained token, the wall and CPU time of the whole stage and its
median tokens/s (padding included) and MFU.

    the default run (after `snakemake --cores 2 results/sample/pretrain/tiny/final.pt`):
        python -m benchmarks.bench_sft --model results/sample/pretrain/tiny/final.pt \\
            --tokenizer results/sample/tokenizer/tokenizer.json --tokens results/sample/tokens
    variants:  ... --variant 'steps300={"sft": {"max_steps": 300}}' \\
                   --variant 'digits2={"tasks": {"arithmetic": {"digits": 2}}}'
    one GPU, the GPT-2 124M shape (random weights: throughput only) on GSM8K + instructions:
        python -m benchmarks.bench_sft --random-base gpt2-124m --seq-len 1024 \\
            --tokenizer results/sample/tokenizer/tokenizer.json --variant 'gsm8k={"sft": {"device": "cuda",
            "mixture": {"arithmetic": 0, "gsm8k": 1, "instruct": 0.2, "replay": 0}, "max_steps": 50, "accuracy_examples": 0}}'
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, write_section
from pipeline.artifacts import write_manifest
from pipeline.config import load_config, section_config
from pipeline.eval.loss import val_loss_bpb
from pipeline.model.gpt import GPT, GPTConfig, load_final
from pipeline.tokenizer import BPETokenizer
from pipeline.train.sft import train

ROOT = Path(__file__).resolve().parent.parent


def random_base(size: str, tokenizer: Path, seq_len: int, folder: Path) -> Path:
    """A final.pt of `size` with random weights, for throughput on a shape no run has pretrained."""
    tok = BPETokenizer.load(tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size(size, vocab_size=tok.n_vocab, seq_len=seq_len))
    path = folder / f"{size}-random.pt"
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 0,
                "vocab_size": tok.n_vocab, "eos_id": tok.eos_id}, path)
    write_manifest(folder / "manifest.json", stage="bench random base", config={"size": size}, inputs=[],
                   outputs={path: None})  # SFT reads only inputs a manifest vouches for
    return path


def variant(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition("=")
    return name, json.loads(overrides or "{}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="pretrain's final.pt")
    parser.add_argument("--random-base", help="a model size with random weights instead of --model (throughput)")
    parser.add_argument("--seq-len", type=int, default=1024, help="context of the --random-base model")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, help="the tokenize stage's folder: replay reads its train split, "
                                                    "the val loss its val split (without it: no val loss)")
    parser.add_argument("--configfile", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--variant", type=variant, action="append",
                        help='NAME={"sft": {...}, "tasks": {...}}: overrides of the two sections (repeatable)')
    parser.add_argument("--out", type=Path, help="keep each variant's run folder under this one (default: a temp folder)")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md (## SFT)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "disabled")
    config = load_config(args.configfile)

    tokenizer = BPETokenizer.load(args.tokenizer)

    def val_loss(final: Path) -> dict | None:
        if args.tokens is None:
            return None
        with torch.no_grad():
            return val_loss_bpb(load_final(final)[0], args.tokens, tokenizer, max_tokens=config["eval"]["val_tokens"])

    rows = ["| variant | steps | lr | mixture | base acc | SFT acc | val loss (x base) | bpb | held-out loss | "
            "trained tokens | wall s | CPU s | tokens/s | MFU |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory(prefix="bench_sft-") as tmp:
        runs = args.out or Path(tmp)
        runs.mkdir(parents=True, exist_ok=True)
        model = random_base(args.random_base, args.tokenizer, args.seq_len, runs) if args.random_base else args.model
        base = val_loss(model)
        if base is not None:
            rows.insert(2, f"| base | 0 | | | | | {base['val_loss']:.3f} (1.00) | {base['bpb']:.3f} | | | | | | |")
        for name, overrides in args.variant or [("default", {})]:
            cfg = section_config("sft", {**config["sft"], **overrides.get("sft", {})})
            tasks = {k: {**v, **overrides.get("tasks", {}).get(k, {})} for k, v in config["tasks"].items()}
            out = runs / name
            start, cpu = time.perf_counter(), time.process_time()
            summary = train(cfg, model_path=model, tokenizer_path=args.tokenizer, out=out,
                            tasks_config=section_config("tasks", tasks), tokens=args.tokens)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            kept = val_loss(out / "final.pt")
            lm = (f"{kept['val_loss']:.3f} ({kept['val_loss'] / base['val_loss']:.2f}) | {kept['bpb']:.3f}"
                  if kept else "- | -")
            m, c = summary["metrics"], summary["counts"]
            acc = lambda key: f"{100 * m[key]['value']:.1f}%" if key in m else "-"  # noqa: E731
            mix = ", ".join(f"{k} {v:g}" for k, v in cfg["mixture"].items() if v)
            mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "-"
            rows.append(f"| {name} | {c['steps']} | {cfg['lr']:g} | {mix} | {acc('arithmetic_accuracy_input')} | "
                        f"{acc('arithmetic_accuracy')} | {lm} | {m['final_val_loss']:.3f} | {c['trained_tokens']:,} | "
                        f"{wall:.0f} | {cpu:.0f} | {m['tokens_per_s']:,.0f} | {mfu} |")
            print("\n".join(rows), flush=True)
    body = (f"Machine: {machine()}. Base: `{args.random_base or args.model}`. Command: "
            f"`python -m benchmarks.bench_sft ...` (see docs/sft.md).\n\n" + "\n".join(rows))
    if args.write:
        write_section("SFT", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
