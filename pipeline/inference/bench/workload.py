"""The benchmark's workload: seeded requests, the same prompts and lengths at every rate.

`num_requests` requests, Poisson arrivals at each rate in `rates` (exponential gaps, seeded) or all
at once ("inf"); prompt and output lengths drawn uniformly from their configured ranges; prompts
cut from the clean data's val token shards at seeded offsets (or random ids), each after a
`shared_prefix_len`-token prefix common to all (a system prompt: what the prefix cache is for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


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
    from pipeline.token_shards import read_shard, split_shards

    parts, total = [], 0
    for path in split_shards(tokens_dir, "val"):
        tokens, _ = read_shard(path, vocab_size)
        parts.append(np.asarray(tokens[:limit - total], dtype=np.int64))
        total += parts[-1].size
        if total >= limit:
            break
    return np.concatenate(parts)
