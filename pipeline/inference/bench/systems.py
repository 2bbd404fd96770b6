"""The ways of serving the benchmark compares, each replaying a workload in real time (a request
is not seen before it arrives) and stamping every token delivery:

    naive         one request at a time, no cache: every token reruns the whole sequence
    kv_cache      one request at a time on the model's contiguous KV cache
    static        static batching: up to max_batch_size requests start together and none joins
                  until all have finished (engine, contiguous cache)
    continuous    continuous batching, contiguous cache (engine)
    paged_prefix  continuous batching, paged cache with prefix caching (engine)
    speculative   paged_prefix + speculative decoding with the draft model
    hf_generate   HF transformers `generate` on the exported model, batches as in static
    http          paged_prefix behind the OpenAI-compatible server on loopback, driven with
                  streaming by a client in a process of its own (`http_client.py`)

Every system decodes greedily with `ignore_eos`, so all produce the same number of tokens. naive,
kv_cache and hf_generate are the references the engine is measured against, so they decode
without it; nothing else does.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.inference.bench.metrics import Clock, Record
from pipeline.inference.bench.workload import BenchRequest
from pipeline.inference.engine import Engine
from pipeline.inference.sampling import SamplingParams
from pipeline.model.gpt import GPT


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


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


def run_engine(engine: Engine, workload: list[BenchRequest], max_concurrency: int | None = None) -> list[Record]:
    """Replay the workload against an engine: add each request when it arrives (and, with
    `max_concurrency`, when fewer are in flight: its latencies then count from then, as the
    http client's do), step while there is work, stamp every delivery."""
    clock, pending, in_flight = Clock(), deque(enumerate(workload)), {}
    out = [Record(r.arrival, r.output_len) for r in workload]
    while pending or engine.has_work():
        while pending and pending[0][1].arrival <= clock.now() and len(in_flight) < (max_concurrency or len(workload)):
            i, r = pending.popleft()
            if max_concurrency:
                out[i].arrival = clock.now()
            in_flight[engine.add_request(r.prompt, greedy(r.output_len))] = out[i]
        if engine.has_work():
            outputs = engine.step()
            t = clock.now()
            for o in outputs:
                in_flight[o.request_id].deliver(t, len(o.new_token_ids))
                in_flight[o.request_id].token_ids += o.new_token_ids
                if o.finished:
                    del in_flight[o.request_id]
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
    """The model's contiguous KV cache (`GPT.new_kv_cache`): the prompt is read once, then each
    token is one forward of that token."""

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


def drive(url: str, model: str, workload: list[BenchRequest], max_concurrency: int | None = None,
          token_ids: bool = False) -> list[Record]:
    """Send the workload's streamed completions to the server at `url` at their arrival times
    (at most `max_concurrency` in flight) from `http_client.py`, a process of its own; each
    request's latencies count from when it was sent."""
    job = {"url": url, "model": model, "requests": [[r.arrival, r.prompt, r.output_len] for r in workload],
           "max_concurrency": max_concurrency, "token_ids": token_ids}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("http_client.py"))], input=json.dumps(job),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the http benchmark client failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return [Record(d["sent"], r.output_len, times=d["times"], tokens=d["tokens"], token_ids=d["token_ids"])
            for r, d in zip(workload, json.loads(done.stdout))]


def free_port() -> int:
    """A loopback port free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_http(engine: Engine, tokenizer: Any, workload: list[BenchRequest]) -> list[Record]:
    """The engine behind the server on loopback, in a thread of this process, driven by `drive`."""
    import uvicorn

    from pipeline.inference.server import create_app

    port = free_port()
    # log_config=None: uvicorn's own logging config would close the job's log file handler
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, "bench", max_waiting=len(workload)),
                                           host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        return drive(f"http://127.0.0.1:{port}", "bench", workload)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
