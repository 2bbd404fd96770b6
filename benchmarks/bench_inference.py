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

With --vllm (the python of a venv holding vLLM's CPU build), the benchmark instead compares our
server with vLLM's on the --hf-model folder (and, with --random-llama, on a Llama-shaped model with
random weights written beside it), in interleaved rounds (`pipeline/inference/bench/peers.py`),
written as the "Inference: our server against vLLM-CPU" section:
        python -m benchmarks.bench_inference --vllm /work/peers/vllm/bin/python \
            --hf-model results/sample/export/pretrain/tiny --tokens results/sample/tokens --random-llama
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
from pipeline.artifacts import atomic_write_json
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
    peer = parser.add_argument_group("against vLLM")
    peer.add_argument("--vllm", help="python of the venv with vLLM's CPU build: compare our server with it on --hf-model")
    peer.add_argument("--random-llama", action="store_true",
                      help="also on a Llama-shaped model with random weights (4 layers, width 512, 8 heads, 2 KV heads)")
    peer.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    peer.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests in flight at most")
    peer.add_argument("--out", default="results/benchmarks/vllm", help="figures (JSON), server logs, the Llama folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.vllm:
        return against_vllm(args)

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
    command = command_line(args, skip=("no_doc", "vllm", "random_llama", "rounds", "concurrency", "out"))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (f"Command: `{command}`  \nMachine: {machine()}; load average {load} at the end (other work on "
            f"this shared machine slows every system); {wall:.0f} s in all.\n\n{table}")
    if args.no_doc:
        print(body)
    else:
        write_section(f"Inference: {name} on {args.device}", body)
    return 0


def command_line(args: argparse.Namespace, skip: tuple[str, ...]) -> str:
    """The command that ran, as written in the doc."""
    flags = []
    for k, v in vars(args).items():
        if k in (*skip, "config") or v in (None, False):
            continue
        flag = f"--{k.replace('_', '-')}"
        flags.append(flag if v is True else f"{flag} {' '.join(map(str, v)) if isinstance(v, list) else v}")
    command = "python -m benchmarks.bench_inference " + " ".join(flags)
    return command + (f" --config '{json.dumps(args.config)}'" if args.config else "")


def against_vllm(args: argparse.Namespace) -> int:
    """Our server, vLLM-CPU's and our engine in-process, on the --hf-model folder (and a random
    Llama-shaped one): the "Inference: our server against vLLM-CPU" section."""
    from pipeline.inference.bench.peers import compare, markdown as peer_markdown, random_llama
    from pipeline.inference.bench.workload import data_tokens, make_workload
    from pipeline.inference.engine import Engine
    from pipeline.inference.serve import load_model

    if not args.hf_model:
        raise SystemExit("--vllm compares the servers on an exported folder: give it with --hf-model")
    cfg = section_config("inference", {**args.config, "workload": {
        "prompts": "data" if args.tokens else "random", "num_requests": 64, "output_len": {"min": 64, "max": 64},
        **args.config.get("workload", {})}})
    torch.set_num_threads(cfg["threads"])
    out, export = Path(args.out), Path(args.hf_model)
    folders = {f"{export.name} (export-hf)": export}
    if args.random_llama:
        folders["Llama-shaped, random weights (4 layers, width 512, 8 heads, 2 KV heads)"] = random_llama(
            out / "llama-random", export)
    start, tables, results = time.perf_counter(), [], {}
    for label, folder in folders.items():
        model, meta = load_model(folder, "cpu")
        source = data_tokens(Path(args.tokens) if args.tokens else None, model.config.vocab_size)
        workload = make_workload(cfg["workload"], float("inf"), source, model.config.vocab_size)
        engine = Engine(model, max_batch_size=max(args.concurrency), block_size=cfg["block_size"],
                        num_blocks=cfg["num_blocks"], stop_token_ids=[] if meta["eos_id"] is None else [meta["eos_id"]])
        results[label] = compare(folder, workload, vllm_python=args.vllm, concurrency=args.concurrency,
                                 rounds=args.rounds, log_dir=out / "logs" / folder.name, engine=engine)
        tables.append(peer_markdown(results[label], label))
        logging.info("%s: done", label)
    atomic_write_json(out / "vllm.json", results)
    wall = time.perf_counter() - start
    w = cfg["workload"]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (f"Command: `{command_line(args, skip=('no_doc', 'size', 'draft', 'device'))}`  \n"
            f"Machine: {machine()}; load average {load} at the end (other work on this shared machine); "
            f"{wall:.0f} s in all.\n\n"
            f"{w['num_requests']} requests of {w['output_len']['max']} tokens each (greedy, `ignore_eos`, streamed), "
            f"prompts {w['shared_prefix_len']} shared + {w['prompt_len']['min']}-{w['prompt_len']['max']} tokens "
            f"({w['prompts']}); at most `concurrency` in flight; {args.rounds} interleaved rounds (the systems' order "
            f"reversed every other round) after a warm-up run of each. serve: `python -m pipeline serve` "
            f"({cfg['threads']} torch thread); vllm: vLLM-CPU's OpenAI server, its defaults; engine: our engine in "
            f"the benchmark's process, no HTTP. Figures are medians over the rounds.\n\n" + "\n".join(tables))
    if args.no_doc:
        print(body)
    else:
        write_section("Inference: our server against vLLM-CPU", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
