"""The http client of the benchmark's servers (ours and vLLM's), run as a process of its own
(`python http_client.py`, the JSON job on stdin): client and server then share no interpreter, so
the latencies measured here include what a real client sees (the loopback socket, the server's
event loop, its queue), not a coroutine in the server's own process. Imports only the standard
library and httpx.

stdin: {"url": base URL, "model": served name, "requests": [[arrival s, prompt ids, max_tokens], ...],
        "max_concurrency": requests in flight at most (null: no limit), "token_ids": ask for them}
stdout: [{"sent": s, "times": [delivery stamps, s], "tokens": completion tokens, "token_ids": [...]}, ...],
one per request, on the clock whose 0 the arrival times count from. With max_concurrency a request
is sent when it has arrived and a slot is free (`vllm bench serve --max-concurrency`).

"token_ids" asks for vLLM's `return_token_ids`: each streamed chunk carries its tokens' ids.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


def read_event(line: str, out: dict) -> bool:
    """One server-sent event line of a streamed completion, its usage and token ids added to
    `out`; True if it delivered a choice (a delivery to stamp)."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False
    chunk = json.loads(line[6:])
    if "error" in chunk:
        raise RuntimeError(f"the server sent an error event: {chunk['error']}")
    if chunk.get("usage"):
        out["tokens"] = chunk["usage"]["completion_tokens"]  # text chunks do not count tokens
        return False
    if not chunk["choices"]:
        return False
    out["token_ids"] += chunk["choices"][0].get("token_ids") or []
    return True


async def one(client: httpx.AsyncClient, job: dict, request: list, t0: float, slots: asyncio.Semaphore) -> dict:
    arrival, prompt, max_tokens = request
    await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
    body = {"model": job["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if job.get("token_ids"):
        body["return_token_ids"] = True
    async with slots:
        out = {"sent": time.perf_counter() - t0, "times": [], "tokens": 0, "token_ids": []}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if read_event(line, out):
                    out["times"].append(time.perf_counter() - t0)
    return out


async def main(job: dict) -> list[dict]:
    n = len(job["requests"])
    slots = asyncio.Semaphore(job.get("max_concurrency") or n)
    async with httpx.AsyncClient(base_url=job["url"], timeout=600, limits=httpx.Limits(max_connections=n)) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(one(client, job, r, t0, slots) for r in job["requests"]))


if __name__ == "__main__":
    json.dump(asyncio.run(main(json.load(sys.stdin))), sys.stdout)
