"""/health latency of a busy server, written as the "Serve: /health under load" section of
docs/benchmarks.md.

`python -m pipeline serve` runs in a process of its own on a random nano model with a 1,024-token
context (latency does not depend on the weights), 32 requests decoding 1,000 tokens each, one new
request arriving every 0.1 s (queued behind the full batch) and a 1 MB prompt posted every 0.1 s
(refused before it is tokenized). This process, not the server's, makes that load in one thread
and probes /health `--probes` times in another, and reports p50, p99 and max. The target, /health
p99 under 50 ms, is in docs/inference.md ("Limits").

    python -m benchmarks.bench_health --tokenizer results/sample/tokenizer/tokenizer.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import torch

from benchmarks.common import machine, start_serve, write_section
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tokenizer import BPETokenizer

RUNNING = 'vllm:num_requests_running{model_name="nano"} 32.0'


def start_server(folder: Path, tokenizer: BPETokenizer) -> tuple[subprocess.Popen, str]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=1024)).eval()
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 0,
                "vocab_size": tokenizer.n_vocab, "eos_id": tokenizer.eos_id}, folder / "final.pt")
    tokenizer.save(folder / "tokenizer.json")
    return start_serve(["--model", str(folder / "final.pt"), "--tokenizer", str(folder / "tokenizer.json"),
                        "--served-model-name", "nano", "--max-batch-size", "32"], folder / "serve.log")


def load(url: str, stop: threading.Event, refused: list[int]) -> None:
    async def run():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        body = dict(model="nano", prompt="Once upon a time", max_tokens=1000, temperature=0.0,
                    extra_body={"ignore_eos": True})
        decoding = [asyncio.create_task(client.completions.create(**body)) for _ in range(32)]
        huge = json.dumps({"prompt": "x" * 1_000_000}).encode()
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while not stop.is_set():
                decoding.append(asyncio.create_task(client.completions.create(**body)))
                r = await http.post("/v1/completions", content=huge, headers={"content-type": "application/json"})
                refused.append(r.status_code)
                await asyncio.sleep(0.1)
        for task in decoding:
            task.cancel()
        await asyncio.gather(*decoding, return_exceptions=True)
    asyncio.run(run())


def probe(url: str, probes: int) -> list[float]:
    """/health latencies in seconds, once the 32 requests decode."""
    with httpx.Client(base_url=url) as http:
        deadline = time.monotonic() + 60
        while RUNNING not in http.get("/metrics").text:
            if time.monotonic() > deadline:
                raise SystemExit("the 32 requests did not start")
            time.sleep(0.05)
        latencies = []
        for _ in range(probes):
            start = time.perf_counter()
            if http.get("/health").status_code != 200:
                raise SystemExit("/health did not answer 200")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
        if RUNNING not in http.get("/metrics").text:
            raise SystemExit("the server was no longer busy at the end of the probes")
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json with the chat tokens")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="servers started, one after another")
    parser.add_argument("--no-doc", action="store_true", help="print the section instead of writing docs/benchmarks.md")
    args = parser.parse_args()
    tokenizer = BPETokenizer.load(args.tokenizer)

    rows = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            proc, url = start_server(Path(tmp), tokenizer)
            stop, refused = threading.Event(), []
            loader = threading.Thread(target=load, args=(url, stop, refused))
            loader.start()
            try:
                ms = sorted(1e3 * t for t in probe(url, args.probes))
            finally:
                stop.set()
                loader.join(timeout=60)
                proc.terminate()
                proc.wait(timeout=60)
        row = (f"| {repeat + 1} | {ms[len(ms) // 2]:.1f} | {ms[int(0.99 * (len(ms) - 1))]:.1f} | {ms[-1]:.1f} | "
               f"{len(refused)} ({', '.join(str(s) for s in sorted(set(refused)))}) |")
        print(row, flush=True)
        rows.append(row)
    body = (f"Command: `python -m benchmarks.bench_health --tokenizer {args.tokenizer}`  \n"
            f"Machine: {machine()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end\n\n"
            f"`serve` on a random nano model (1,024-token context), 32 requests decoding 1,000 tokens, one more "
            f"arriving every 0.1 s, a 1 MB prompt posted every 0.1 s; {args.probes} /health probes per server, "
            f"one every 10 ms, from the load's client process (not the server's).\n\n"
            "| server | /health p50 ms | p99 ms | max ms | 1 MB prompts posted (status) |\n"
            "| ---: | ---: | ---: | ---: | --- |\n" + "\n".join(rows))
    if args.no_doc:
        print(body)
    else:
        write_section("Serve: /health under load", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
