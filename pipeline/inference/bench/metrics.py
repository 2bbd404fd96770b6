"""The benchmark's metrics, vLLM bench serve's definitions, from each request's delivery stamps.

TTFT (arrival to first token), TPOT (time per output token after the first, per request), ITL
(gaps between successive token deliveries), E2E latency; mean, median, p90 and p99 of each; output
tokens/s and requests/s over the run's wall time; goodput, the requests/s that met the SLO (TTFT
and TPOT both within it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Record:
    """One request's arrival and delivery stamps, in seconds on its run's clock."""
    arrival: float
    output_len: int
    times: list[float] = field(default_factory=list)  # one per delivery (a delivery may carry several tokens)
    tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # where the system reports them (greedy-match checks)

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
        return {"mean": float(x.mean()), "median": float(np.median(x)), "p90": float(np.percentile(x, 90)),
                "p99": float(np.percentile(x, 99))} if x.size else {"mean": None, "median": None, "p90": None, "p99": None}

    return {"requests": len(records), "output_tokens": int(n_out.sum()), "duration_s": duration,
            "output_tokens_per_s": float(n_out.sum() / duration), "requests_per_s": len(records) / duration,
            "goodput_requests_per_s": good / duration, "slo_met": good,
            "ttft_ms": stats(ttft), "tpot_ms": stats(tpot), "itl_ms": stats(itl), "e2e_ms": stats(e2e)}
