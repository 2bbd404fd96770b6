"""Serving benchmark, in the manner of `vllm bench serve`: one seeded workload, replayed against
several ways of serving the same model, at several request rates.

<out>: bench.json (every figure), bench.md (tables and the goals), throughput.png (output tokens/s
against the request rate), latency.png (TTFT, TPOT and end-to-end latency percentiles), manifest.json.

Workload: `num_requests` requests, Poisson arrivals at each rate in `rates` (exponential gaps,
seeded) and all at once ("inf"); prompt and output lengths drawn uniformly from their configured
ranges; prompts cut from the clean data's val token shards at seeded offsets (or random ids),
each after a `shared_prefix_len`-token prefix common to all (a system prompt: what the prefix cache
is for); greedy decoding with `ignore_eos`, so every system produces the same number of tokens.

Systems, each serving the workload in real time (a request is not seen before it arrives):
    naive         one request at a time, no cache: every token reruns the whole sequence
    kv_cache      one request at a time on the model's own KV cache (as GPT.generate)
    static        static batching: up to max_batch_size requests start together and none joins
                  until all have finished (engine, contiguous cache)
    continuous    continuous batching, contiguous cache (engine)
    paged_prefix  continuous batching, paged cache with prefix caching (engine)
    speculative   paged_prefix + speculative decoding with the draft model
    hf_generate   HF transformers `generate` on the exported model, batches as in static
    http          paged_prefix behind the OpenAI-compatible server, driven over loopback HTTP
                  with streaming (client and server share this process and its cores)

Metrics per system and rate (vLLM's definitions): TTFT (arrival to first token), TPOT (time per
output token after the first, per request), ITL (gaps between successive token deliveries), E2E
latency; mean, median and p99 of each; output tokens/s and requests/s over the run's wall time;
goodput, the requests/s that met the SLO (TTFT and TPOT both within it); KV-cache usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import atomic_path, atomic_write_json, atomic_write_text, check_inputs, write_manifest
from pipeline.config import section_config
from pipeline.inference.engine import Engine
from pipeline.inference.sampling import SamplingParams
from pipeline.model.gpt import GPT

log = logging.getLogger(__name__)

SYSTEMS = ("naive", "kv_cache", "static", "continuous", "paged_prefix", "speculative", "hf_generate", "http")


# --- the workload ------------------------------------------------------------------------------

@dataclass
class BenchRequest:
    arrival: float  # seconds after the start
    prompt: list[int]
    output_len: int


def draw_lengths(spec: dict[str, int], n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(spec["min"], spec["max"] + 1, size=n)


def make_workload(cfg: dict[str, Any], rate: float, source: np.ndarray, vocab_size: int) -> list[BenchRequest]:
    """The seeded requests of one run: the same prompts and lengths at every rate (only the
    arrival times differ, from their own seeded stream)."""
    n, rng = cfg["num_requests"], np.random.default_rng(cfg["seed"])
    prompt_lens, output_lens = draw_lengths(cfg["prompt_len"], n, rng), draw_lengths(cfg["output_len"], n, rng)
    if source.size:  # windows of the clean data
        starts = rng.integers(0, source.size - cfg["shared_prefix_len"] - cfg["prompt_len"]["max"], size=n + 1)
        prefix = source[starts[n]:starts[n] + cfg["shared_prefix_len"]].tolist()
        prompts = [prefix + source[s:s + int(k)].tolist() for s, k in zip(starts, prompt_lens)]
    else:
        prefix = rng.integers(0, vocab_size, size=cfg["shared_prefix_len"]).tolist()
        prompts = [prefix + rng.integers(0, vocab_size, size=int(k)).tolist() for k in prompt_lens]
    if math.isinf(rate):
        arrivals = np.zeros(n)
    else:  # a Poisson process: exponential gaps of mean 1 / rate
        gaps = np.random.default_rng([cfg["seed"], 1]).exponential(1.0 / rate, size=n)
        arrivals = np.cumsum(gaps) - gaps[0]
    return [BenchRequest(float(a), p, int(k)) for a, p, k in zip(arrivals, prompts, output_lens)]


def data_tokens(tokens_dir: Path | None, vocab_size: int, limit: int = 1_000_000) -> np.ndarray:
    """The first `limit` tokens of the val split (empty without a tokens folder: random prompts)."""
    if tokens_dir is None:
        return np.zeros(0, dtype=np.int64)
    from pipeline.token_shards import read_shard
    from pipeline.train.data import split_shards

    parts, total = [], 0
    for path in split_shards(tokens_dir, "val"):
        tokens, _ = read_shard(path, vocab_size)
        parts.append(np.asarray(tokens[:limit - total], dtype=np.int64))
        total += parts[-1].size
        if total >= limit:
            break
    return np.concatenate(parts)


# --- timing records ----------------------------------------------------------------------------

@dataclass
class Record:
    arrival: float
    output_len: int
    times: list[float] = field(default_factory=list)  # one per delivery (a delivery may carry several tokens)
    tokens: int = 0

    def deliver(self, t: float, n: int) -> None:
        if n:
            self.times.append(t)
            self.tokens += n


class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


# --- the systems -------------------------------------------------------------------------------

def run_engine(engine: Engine, workload: list[BenchRequest]) -> list[Record]:
    """Replay the workload against an engine: add each request when it arrives, step while
    there is work, stamp every delivery."""
    clock, pending, records = Clock(), deque(enumerate(workload)), {}
    out = [Record(r.arrival, r.output_len) for r in workload]
    while pending or engine.has_work():
        while pending and pending[0][1].arrival <= clock.now():
            i, r = pending.popleft()
            records[engine.add_request(r.prompt, greedy(r.output_len))] = out[i]
        if engine.has_work():
            outputs = engine.step()
            t = clock.now()
            for o in outputs:
                records[o.request_id].deliver(t, len(o.new_token_ids))
        else:
            clock.wait_until(pending[0][1].arrival)
    return out


def run_one_at_a_time(stream: Callable[[list[int], int], Iterator[int]], workload: list[BenchRequest]) -> list[Record]:
    """One request at a time, first come first served; `stream(prompt, n)` yields each token."""
    clock, out = Clock(), []
    for r in workload:
        clock.wait_until(r.arrival)
        rec = Record(r.arrival, r.output_len)
        for _ in stream(r.prompt, r.output_len):
            rec.deliver(clock.now(), 1)
        out.append(rec)
    return out


def naive_stream(model: GPT) -> Callable[[list[int], int], Iterator[int]]:
    """No cache: each token is the argmax of a forward over the whole sequence so far."""
    vocab = model.config.vocab_size

    @torch.no_grad()
    def stream(prompt: list[int], n: int) -> Iterator[int]:
        idx = torch.tensor([prompt], device=next(model.parameters()).device)
        for _ in range(n):
            next_id = model(idx)[0, -1, :vocab].argmax().view(1, 1)
            idx = torch.cat([idx, next_id], dim=1)
            yield int(next_id)

    return stream


def kv_cache_stream(model: GPT) -> Callable[[list[int], int], Iterator[int]]:
    """The model's own KV cache (pipeline/model/gpt.py, as GPT.generate uses it): the prompt is
    read once, then each token is one forward of that token."""

    @torch.no_grad()
    def stream(prompt: list[int], n: int) -> Iterator[int]:
        idx = torch.tensor([prompt], device=next(model.parameters()).device)
        cache = model.new_kv_cache(1, len(prompt) + n)
        logits = model(idx, kv_cache=cache)
        for i in range(n):
            next_id = logits[0, -1, :model.config.vocab_size].argmax().view(1, 1)
            yield int(next_id)
            if i + 1 < n:
                logits = model(next_id, kv_cache=cache)

    return stream


def run_hf(hf_model: Any, workload: list[BenchRequest], batch_size: int, pad_id: int) -> list[Record]:
    """HF `generate` in static batches: when the previous batch is done, every waiting request
    (up to batch_size) is left-padded into one batch and generated to the longest output asked
    for; a streamer stamps each step."""
    from transformers.generation.streamers import BaseStreamer

    class Stamp(BaseStreamer):
        def __init__(self, records: list[Record], clock: Clock):
            self.records, self.clock, self.prompt_seen = records, clock, False

        def put(self, value):
            if not self.prompt_seen:  # the first call carries the prompts
                self.prompt_seen = True
                return
            t = self.clock.now()
            for rec in self.records:
                if rec.tokens < rec.output_len:
                    rec.deliver(t, 1)

        def end(self):
            pass

    clock, pending, out = Clock(), deque(workload), []
    device = next(hf_model.parameters()).device
    while pending:
        clock.wait_until(pending[0].arrival)
        batch = []
        while pending and pending[0].arrival <= clock.now() and len(batch) < batch_size:
            batch.append(pending.popleft())
        width = max(len(r.prompt) for r in batch)
        ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=device)
        records = [Record(r.arrival, r.output_len) for r in batch]
        n = max(r.output_len for r in batch)
        with torch.no_grad():
            hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=pad_id, streamer=Stamp(records, clock))
        out += records
    return out


def run_http(engine: Engine, tokenizer: Any, workload: list[BenchRequest]) -> list[Record]:
    """The engine behind the server on loopback; streamed completions sent at their arrival times."""
    import httpx
    import uvicorn

    from pipeline.inference.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # log_config=None: uvicorn's own logging config would close the job's log file handler
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, "bench", max_waiting=len(workload)),
                                           host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    async def one(client: httpx.AsyncClient, r: BenchRequest, rec: Record, clock: Clock) -> None:
        await asyncio.sleep(max(0.0, r.arrival - clock.now()))
        body = {"model": "bench", "prompt": r.prompt, "max_tokens": r.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    rec.tokens = chunk["usage"]["completion_tokens"]  # text chunks do not count tokens
                elif chunk["choices"]:
                    rec.times.append(clock.now())

    async def main() -> list[Record]:
        records = [Record(r.arrival, r.output_len) for r in workload]
        limits = httpx.Limits(max_connections=len(workload))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
            clock = Clock()
            await asyncio.gather(*(one(client, r, rec, clock) for r, rec in zip(workload, records)))
        return records

    try:
        return asyncio.run(main())
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- metrics -----------------------------------------------------------------------------------

def summarize(records: list[Record], slo: dict[str, float]) -> dict[str, Any]:
    """vLLM bench serve's figures from the delivery stamps (latencies in ms)."""
    ttft = np.array([r.times[0] - r.arrival for r in records])
    e2e = np.array([r.times[-1] - r.arrival for r in records])
    n_out = np.array([r.tokens for r in records])
    tpot = np.array([(e - t) / (n - 1) for e, t, n in zip(e2e, ttft, n_out) if n > 1])
    itl = np.concatenate([np.diff(r.times) for r in records if len(r.times) > 1] or [np.zeros(0)])
    duration = max(r.times[-1] for r in records) - min(r.arrival for r in records)
    good = sum(1 for t, e, n in zip(ttft, e2e, n_out)
               if t <= slo["ttft_s"] and (n <= 1 or (e - t) / (n - 1) <= slo["tpot_s"]))

    def stats(x: np.ndarray) -> dict[str, float]:
        x = x * 1000.0
        return {"mean": float(x.mean()), "median": float(np.median(x)), "p99": float(np.percentile(x, 99))} \
            if x.size else {"mean": None, "median": None, "p99": None}

    return {"requests": len(records), "output_tokens": int(n_out.sum()), "duration_s": duration,
            "output_tokens_per_s": float(n_out.sum() / duration), "requests_per_s": len(records) / duration,
            "goodput_requests_per_s": good / duration, "slo_met": good,
            "ttft_ms": stats(ttft), "tpot_ms": stats(tpot), "itl_ms": stats(itl), "e2e_ms": stats(e2e)}


# --- the run -----------------------------------------------------------------------------------

def engine_for(system: str, model: GPT, draft: GPT | None, cfg: dict[str, Any], stop_ids: list[int]) -> Engine:
    common = dict(max_batch_size=cfg["max_batch_size"], chunked_prefill=cfg["chunked_prefill"],
                  max_num_batched_tokens=cfg["max_num_batched_tokens"], stop_token_ids=stop_ids)
    if system == "static":
        return Engine(model, **common, paged=False, scheduling="static")
    if system == "continuous":
        return Engine(model, **common, paged=False)
    paged = dict(block_size=cfg["block_size"], num_blocks=cfg["num_blocks"], prefix_caching=True)
    if system == "speculative":
        return Engine(model, **common, **paged, draft_model=draft, num_speculative_tokens=cfg["num_speculative_tokens"])
    return Engine(model, **common, **paged)  # paged_prefix and http


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


# --- report ------------------------------------------------------------------------------------

def rate_label(rate: str) -> str:
    return "all at once" if math.isinf(float(rate)) else f"{float(rate):g} req/s"


def goals(results: dict[str, dict[str, Any]], burst: str | None) -> list[str]:
    """The issue's goals, checked at the all-at-once load (every request concurrent)."""
    if burst is None:
        return ["(no all-at-once rate configured: the goals are checked there)"]
    tps = {s: r[burst]["output_tokens_per_s"] for s, r in results.items() if burst in r}
    lines = []
    for base, want in (("naive", 10.0), ("hf_generate", 1.0)):
        for system in ("continuous", "paged_prefix"):
            if system in tps and base in tps:
                ratio = tps[system] / tps[base]
                verdict = "met" if ratio >= want else "NOT met"
                lines.append(f"- {system} / {base} output tokens/s: **{ratio:.1f}x** (goal >= {want:g}x: {verdict})")
    return lines or ["(the systems the goals compare were not run)"]


def markdown(report: dict[str, Any]) -> str:
    results, cfg = report["results"], report["config"]
    w = cfg["workload"]
    lines = [f"# Inference benchmark: `{report['model']}`", "",
             f"{w['num_requests']} requests per rate; prompts {w['shared_prefix_len']} shared + "
             f"{w['prompt_len']['min']}-{w['prompt_len']['max']} tokens ({w['prompts']}), outputs "
             f"{w['output_len']['min']}-{w['output_len']['max']} tokens (greedy, ignore_eos); max_batch_size "
             f"{cfg['max_batch_size']}, block_size {cfg['block_size']}; SLO: TTFT <= {cfg['slo']['ttft_s']} s and "
             f"TPOT <= {cfg['slo']['tpot_s']} s. Device: {report['device']}, {report['threads']} thread(s).", ""]
    burst = next((r for r in map(str, cfg["rates"]) if math.isinf(float(r))), None)
    lines += ["## Goals", "", *goals(results, burst), ""]
    for rate in map(str, cfg["rates"]):
        lines += [f"## {rate_label(rate)}", "",
                  "| system | out tok/s | req/s | goodput req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
                  "ITL p50 ms | E2E p50 / p99 ms | KV use mean / max | accept |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for system, per_rate in results.items():
            m = per_rate.get(rate)
            if m is None:
                continue
            e = m["engine"]

            def ms(x: dict, k: str) -> str:
                return "-" if x[k] is None else f"{x[k]:.1f}"

            kv = f"{e['kv_usage_mean']:.2f} / {e['kv_usage_max']:.2f}" if e else "-"
            accept = f"{e['acceptance_rate']:.2f}" if e and e.get("acceptance_rate") is not None else "-"
            lines.append(f"| {system} | {m['output_tokens_per_s']:.1f} | {m['requests_per_s']:.2f} | "
                         f"{m['goodput_requests_per_s']:.2f} | {ms(m['ttft_ms'], 'median')} / {ms(m['ttft_ms'], 'p99')} | "
                         f"{ms(m['tpot_ms'], 'median')} / {ms(m['tpot_ms'], 'p99')} | {ms(m['itl_ms'], 'median')} | "
                         f"{ms(m['e2e_ms'], 'median')} / {ms(m['e2e_ms'], 'p99')} | {kv} | {accept} |")
        lines.append("")
    if report["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{s} ({why})" for s, why in report["skipped"].items()), ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> None:
    """throughput.png: output tokens/s against the rate (all at once drawn at the right);
    latency.png: TTFT, TPOT and E2E p50 and p99 per system at the heaviest load."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, rates = report["results"], [str(r) for r in report["config"]["rates"]]
    xs = list(range(len(rates)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, per_rate in results.items():
        ax.plot(xs, [per_rate[r]["output_tokens_per_s"] for r in rates], marker="o", label=system)
    ax.set_xticks(xs, [rate_label(r) for r in rates])
    ax.set_yscale("log")
    ax.set_xlabel("request rate (Poisson arrivals)")
    ax.set_ylabel("output tokens / s (log)")
    ax.set_title(f"{report['model']}: throughput against load")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "throughput.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    heaviest = rates[-1]
    systems = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "end-to-end")):
        for j, stat in enumerate(("median", "p99")):
            values = [results[s][heaviest][key][stat] or 0.0 for s in systems]
            ax.bar(np.arange(len(systems)) + (j - 0.5) * 0.4, values, width=0.4, label=stat)
        ax.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{title} (ms, log), {rate_label(heaviest)}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "latency.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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
