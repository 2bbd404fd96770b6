"""The http system's client, run as a process of its own (`python http_client.py`, the JSON job on
stdin): client and server then share no interpreter, so the latencies measured here include
what a real client sees (the loopback socket, the server's event loop, its queue), not a
coroutine in the server's own process. Imports only the standard library and httpx.

stdin: {"url": base URL, "model": served name, "requests": [[arrival s, prompt ids, max_tokens], ...]}
stdout: [{"times": [delivery stamps, s], "tokens": completion tokens}, ...], one per request, on
the clock whose 0 the arrival times count from.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


async def one(client: httpx.AsyncClient, model: str, arrival: float, prompt: list[int], max_tokens: int,
              t0: float) -> dict:
    await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    times, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]  # text chunks do not count tokens
            elif chunk["choices"]:
                times.append(time.perf_counter() - t0)
    return {"times": times, "tokens": tokens}


async def main(job: dict) -> list[dict]:
    limits = httpx.Limits(max_connections=len(job["requests"]))
    async with httpx.AsyncClient(base_url=job["url"], timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(one(client, job["model"], *r, t0) for r in job["requests"]))


if __name__ == "__main__":
    json.dump(asyncio.run(main(json.load(sys.stdin))), sys.stdout)
