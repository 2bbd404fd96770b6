"""Serving benchmark, in the manner of `vllm bench serve`: one seeded workload, replayed against
several ways of serving the same model, at several request rates.

<out>: bench.json (every figure), bench.md (a table per rate and the speedups), throughput.png
(output tokens/s per system and rate), latency.png (TTFT, TPOT and end-to-end latency
percentiles), manifest.json.

The parts: workload.py (the seeded requests), systems.py (the ways of serving),
metrics.py (the delivery stamps and vLLM's figures), report.py (bench.md and the plots),
http_client.py (the servers' client, a process of its own), and peers.py (our server against
vLLM's CPU build, interleaved, on an exported folder: benchmarks/bench_inference.py --vllm).
This file runs every system at every rate (`bench`) and is the `python -m pipeline
inference-bench` command.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import atomic_write_json, atomic_write_text, check_inputs, write_manifest
from pipeline.config import section_config
from pipeline.inference.bench.metrics import summarize
from pipeline.inference.bench.report import markdown, plot
from pipeline.inference.bench.systems import (engine_for, kv_cache_stream, naive_stream, run_engine, run_hf,
                                              run_http, run_one_at_a_time)
from pipeline.inference.bench.workload import data_tokens, make_workload
from pipeline.model.gpt import GPT

log = logging.getLogger(__name__)


def bench(model: GPT, cfg: dict[str, Any], *, draft: GPT | None = None, hf_model: Any = None, tokenizer: Any = None,
          source: np.ndarray | None = None, stop_ids: list[int] = ()) -> dict[str, Any]:
    """Every configured system at every configured rate; systems whose inputs are missing
    (no draft model, no exported model, no tokenizer) are skipped with the reason."""
    w = cfg["workload"]
    if w["shared_prefix_len"] + w["prompt_len"]["max"] + w["output_len"]["max"] > model.config.seq_len:
        raise ValueError(f"inference.workload: shared_prefix_len + prompt_len.max + output_len.max = "
                         f"{w['shared_prefix_len'] + w['prompt_len']['max'] + w['output_len']['max']} tokens exceed "
                         f"the model's context of {model.config.seq_len}")
    missing = {"speculative": draft is None and "no draft model", "hf_generate": hf_model is None and "no exported HF model",
               "http": tokenizer is None and "no tokenizer"}
    systems = [s for s in cfg["systems"] if not missing.get(s)]
    skipped = {s: missing[s] for s in cfg["systems"] if missing.get(s)}
    source = np.zeros(0, dtype=np.int64) if source is None else source
    results: dict[str, dict[str, Any]] = {s: {} for s in systems}
    for rate in cfg["rates"]:
        r = float(rate)
        workload = make_workload(w, r, source, model.config.vocab_size)
        for system in systems:
            if system == "naive":
                records, extra = run_one_at_a_time(naive_stream(model), workload), {}
            elif system == "kv_cache":
                records, extra = run_one_at_a_time(kv_cache_stream(model), workload), {}
            elif system == "hf_generate":
                records, extra = run_hf(hf_model, workload, cfg["max_batch_size"], pad_id=stop_ids[0] if stop_ids else 0), {}
            else:
                engine = engine_for(system, model, draft, cfg, list(stop_ids))
                records = run_http(engine, tokenizer, workload) if system == "http" else run_engine(engine, workload)
                extra = engine.kv_stats()
            summary = {**summarize(records, cfg["slo"]), "engine": extra}
            results[system][str(rate)] = summary
            log.info("%-12s rate %-5s %7.1f tok/s  ttft p50 %7.1f ms  tpot p50 %6.1f ms", system, rate,
                     summary["output_tokens_per_s"], summary["ttft_ms"]["median"], summary["tpot_ms"]["median"] or 0)
    return {"results": results, "skipped": skipped}


# --- command line ------------------------------------------------------------------------------

OUTPUTS = ("bench.json", "bench.md", "throughput.png", "latency.png")


def add_arguments(parser) -> None:
    from pipeline.cli import json_arg

    parser.add_argument("--model", required=True, help="final.pt of the model served")
    parser.add_argument("--draft", help="final.pt of the draft model (speculative decoding); none: skip that system")
    parser.add_argument("--tokenizer", help="tokenizer.json (the http system decodes text with it)")
    parser.add_argument("--tokens", help="tokens stage folder: prompts are cut from its val split")
    parser.add_argument("--hf-model", help="exported HF folder (export-hf) for the hf_generate peer")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", type=json_arg, default={}, help="the `inference` config section (JSON or @file)")


def load_inputs(model: GPT, *, draft: str | None, tokenizer: str | None, hf_model: str | None, tokens: str | None,
                device: str) -> dict[str, Any]:
    """bench()'s inputs beside the model, each loaded from its file when given."""
    from pipeline.model.gpt import load_final
    from pipeline.tokenizer.bpe import BPETokenizer

    inputs = {"draft": load_final(draft, device)[0] if draft else None,
              "tokenizer": BPETokenizer.load(tokenizer) if tokenizer else None, "hf_model": None,
              "source": data_tokens(Path(tokens) if tokens else None, model.config.vocab_size)}
    if hf_model:
        from transformers import AutoModelForCausalLM
        inputs["hf_model"] = AutoModelForCausalLM.from_pretrained(hf_model).to(device).eval()
    return inputs


def run(args) -> int:
    from pipeline.model.gpt import load_final

    cfg = section_config("inference", args.config)
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["workload"]["seed"])
    device = "cuda" if cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available()) else "cpu"
    if cfg["workload"]["prompts"] == "data" and not args.tokens:
        raise ValueError("inference.workload.prompts is 'data' but no --tokens folder was given")
    check_inputs(args.model, args.draft, args.tokenizer, args.hf_model)  # the tokens are checked as they are read
    model, meta = load_final(args.model, device)
    tokens = args.tokens if cfg["workload"]["prompts"] == "data" else None
    inputs = load_inputs(model, draft=args.draft, tokenizer=args.tokenizer, hf_model=args.hf_model, tokens=tokens,
                         device=device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = bench(model, cfg, **inputs, stop_ids=[int(meta["eos_id"])])
    report = {"model": Path(args.model).parent.name, "device": device, "threads": cfg["threads"], "config": cfg,
              **result}
    atomic_write_json(out / "bench.json", report)
    atomic_write_text(out / "bench.md", markdown(report))
    plot(report, out)
    files = [p for p in (args.model, args.draft, args.tokenizer, args.hf_model and Path(args.hf_model) / "config.json")
             if p]
    burst = next((str(r) for r in cfg["rates"] if math.isinf(float(r))), None)
    metrics = {f"{s}_output_tokens_per_s": r[burst]["output_tokens_per_s"] for s, r in result["results"].items()} \
        if burst else {}
    write_manifest(out / "manifest.json", stage="inference_bench", config=cfg, inputs=files,
                   outputs={out / name: None for name in OUTPUTS},
                   counts={"systems": len(result["results"]), "rates": len(cfg["rates"])}, metrics=metrics)
    log.info("wrote %s", out / "bench.md")
    return 0
