"""Serving benchmark figures for docs/benchmarks.md: `pipeline.inference.bench` on trained models
(or random weights of a named size: throughput with greedy `ignore_eos` decoding does not depend on
the weights, only speculative acceptance does), written as the "Inference" section.

    CPU, the default run's models:
        python -m benchmarks.bench_inference --model results/sample/pretrain/tiny/final.pt \\
            --draft results/sample/pretrain/nano/final.pt --tokens results/sample/tokens \\
            --tokenizer results/sample/tokenizer/tokenizer.json
    one GPU, the GPT-2 124M shape (random weights, no draft):
        python -m benchmarks.bench_inference --size gpt2-124m --device cuda --config '{"max_batch_size": 64}'

The HF transformers peer runs on an exported folder (`python -m pipeline export-hf`), given with
--hf-model; without it that system is skipped and the section says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from benchmarks.common import machine, write_section
from pipeline.cli import json_arg
from pipeline.config import section_config
from pipeline.inference.bench import bench, load_inputs
from pipeline.inference.bench.report import markdown
from pipeline.model.gpt import GPT, GPTConfig, load_final


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="final.pt to serve")
    parser.add_argument("--size", help="or: random weights of this size (seq_len 1024, GPT-2's vocabulary)")
    parser.add_argument("--draft", help="final.pt of the draft model")
    parser.add_argument("--tokens", help="tokens folder: prompts from its val split (default: random ids)")
    parser.add_argument("--tokenizer", help="tokenizer.json, for the http system")
    parser.add_argument("--hf-model", help="the model's export-hf folder, for the hf_generate peer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", type=json_arg, default={}, help="inference config section overrides")
    parser.add_argument("--no-doc", action="store_true", help="print the section instead of writing docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    cfg = section_config("inference", {**args.config, "workload": {
        "prompts": "data" if args.tokens else "random", **args.config.get("workload", {})}})
    torch.set_num_threads(cfg["threads"])
    if args.model:
        model, meta = load_final(args.model, args.device)
        name, eos = Path(args.model).parent.name, int(meta["eos_id"])
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_size(args.size, vocab_size=50257, seq_len=1024)).to(args.device).eval()
        name, eos = f"{args.size} (random weights)", 50256
    inputs = load_inputs(model, draft=args.draft, tokenizer=args.tokenizer, hf_model=args.hf_model, tokens=args.tokens,
                         device=args.device)

    start = time.perf_counter()
    result = bench(model, cfg, **inputs, stop_ids=[eos])
    wall = time.perf_counter() - start
    report = {"model": name, "device": args.device, "threads": cfg["threads"], "config": cfg, **result}
    # without the page title, its sections one level down (they sit inside this section)
    table = markdown(report).split("\n", 2)[2].replace("\n## ", "\n### ")
    command = "python -m benchmarks.bench_inference " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v and k not in ("config", "no_doc"))
    if args.config:
        command += f" --config '{json.dumps(args.config)}'"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (f"Command: `{command}`  \nMachine: {machine()}; load average {load} at the end (other work on "
            f"this shared machine slows every system); {wall:.0f} s in all.\n\n{table}")
    if args.no_doc:
        print(body)
    else:
        write_section(f"Inference: {name} on {args.device}", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
