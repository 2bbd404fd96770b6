"""Our server against vLLM's CPU build, in one run, on the same exported folder and workload.

    serve   `python -m pipeline serve --model <folder>`, a process of its own
    vllm    vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`), from its own venv
    engine  our engine in this process (paged, prefix cache), no HTTP: what the server costs

Both servers are started once per folder and driven by the same client (`http_client.py`):
streamed, greedy, `ignore_eos` completions, at most `c` requests in flight for each concurrency
`c` (`vllm bench serve --max-concurrency`). Rounds are interleaved and the systems' order
alternates from round to round, so a change of load on a shared machine falls on each alike;
the ratios are taken within a round. Every request asks for its token ids (vLLM's
`return_token_ids`), so greedy outputs are compared token for token. Beside the latencies, each
run counts the CPU time its server spent per output token (all of its processes; the client's
not), which a loaded machine changes far less than it changes wall time.

vLLM is a peer, never a dependency: its CPU build lives in a venv of its own
(docs/benchmarks.md has the install commands), whose python is given here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.inference.bench.metrics import Record, summarize
from pipeline.inference.bench.systems import drive, free_port, run_engine
from pipeline.inference.bench.workload import BenchRequest

SYSTEMS = ("serve", "vllm", "engine")
SERVED_NAME = "bench"
# vLLM-CPU's settings for a small model on a shared CPU: 1 GiB of KV cache, no hub, no usage stats
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
NO_SLO = {"ttft_s": float("inf"), "tpot_s": float("inf")}  # goodput is not compared here


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (Linux's /proc): a server's cost
    per token that, unlike its latency, other work on the machine hardly changes."""
    tree, stats = {pid}, {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:  # gone meanwhile
            continue
        stats[int(path.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    grew = True
    while grew:
        size = len(tree)
        tree |= {p for p, (ppid, _) in stats.items() if ppid in tree}
        grew = len(tree) > size
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


def serve_command(folder: Path, port: int, max_batch_size: int) -> list[str]:
    return [sys.executable, "-m", "pipeline", "serve", "--model", str(folder), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(max_batch_size), "--device", "cpu"]


def vllm_command(python: str, folder: Path, port: int) -> list[str]:
    """vLLM's server as installed (its defaults: the model's context, prefix caching, chunked prefill)."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
            SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]


@contextmanager
def server(command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
           timeout: float = 600.0) -> Iterator[tuple[str, int]]:
    """A server process, its output in `log_path`, until it answers /v1/models; yields its URL
    and pid, and stops it (SIGTERM, then SIGKILL) on the way out."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{command[0]} {' '.join(command[1:4])} exited with {proc.returncode} before "
                                   f"answering (its log, {log_path}):\n{tail}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} {' '.join(command[1:4])} did not answer within {timeout:.0f} s "
                                   f"(its log: {log_path})")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def greedy_matches(a: list[Record], b: list[Record]) -> int:
    """Requests whose token ids are the same in both runs (every request must report its ids)."""
    if len(a) != len(b):
        raise ValueError(f"runs of {len(a)} and {len(b)} requests: not the same workload")
    for rec in (*a, *b):
        if len(rec.token_ids) != rec.tokens:
            raise ValueError(f"a request reported {len(rec.token_ids)} token ids for {rec.tokens} tokens: the "
                             f"server did not return its token ids")
    return sum(x.token_ids == y.token_ids for x, y in zip(a, b))


def order(systems: list[str], round_: int) -> list[str]:
    """The systems in the order a round runs them: reversed every other round."""
    return list(systems) if round_ % 2 == 0 else list(reversed(systems))


def compare(folder: Path, workload: list[BenchRequest], *, vllm_python: str | None, concurrency: list[int],
            rounds: int, log_dir: Path, engine: Any = None) -> dict[str, Any]:
    """Every system at every concurrency, `rounds` interleaved rounds on `folder`, after one
    unmeasured warm-up run of each (first compilation, allocation, the prefix cache). `engine`: our
    engine over the folder's model for the in-process system (None: skipped); `vllm_python`: the
    vLLM venv's python (None: skipped). Returns each run's summary and the greedy matches."""
    log_dir.mkdir(parents=True, exist_ok=True)
    systems = ["serve", *(["vllm"] if vllm_python else []), *(["engine"] if engine is not None else [])]
    ports = {s: free_port() for s in ("serve", "vllm")}
    commands = {"serve": (serve_command(folder, ports["serve"], max(concurrency)), {}),
                "vllm": (vllm_command(vllm_python or "", folder, ports["vllm"]), VLLM_ENV)}
    runs: dict[str, dict[str, list[dict]]] = {s: {str(c): [] for c in concurrency} for s in systems}
    records: dict[tuple[str, int, int], list[Record]] = {}
    with ExitStack() as stack:
        servers = {s: stack.enter_context(server(command, ports[s], log_dir / f"{s}.log", env))
                   for s, (command, env) in commands.items() if s in systems}

        def run(system: str, c: int) -> tuple[list[Record], float]:
            """The run's records and the CPU seconds its server (or this process, for the engine) spent."""
            if system == "engine":
                start = time.process_time()
                return run_engine(engine, workload, max_concurrency=c), time.process_time() - start
            url, pid = servers[system]
            start = cpu_seconds(pid)
            recs = drive(url, SERVED_NAME, workload, max_concurrency=c, token_ids=True)
            return recs, cpu_seconds(pid) - start

        for system in systems:
            run(system, max(concurrency))
        for r in range(rounds):
            for c in concurrency:
                for system in order(systems, r):
                    load = os.getloadavg()[0]
                    recs, cpu = run(system, c)
                    records[system, c, r] = recs
                    figures = summarize(recs, NO_SLO)
                    runs[system][str(c)].append({**figures, "load_1min": load,
                                                 "cpu_ms_per_token": 1000 * cpu / figures["output_tokens"]})
    matches = {f"{s}/vllm": {str(c): [greedy_matches(records[s, c, r], records["vllm", c, r]) for r in range(rounds)]
                             for c in concurrency} for s in systems if s != "vllm" and "vllm" in systems}
    return {"folder": str(folder), "systems": systems, "concurrency": concurrency, "rounds": rounds,
            "requests": len(workload), "runs": runs, "greedy_matches": matches}


# --- the figures -------------------------------------------------------------------------------

FIGURES = {"tok/s": lambda s: s["output_tokens_per_s"], "TTFT mean": lambda s: s["ttft_ms"]["mean"],
           "TTFT p90": lambda s: s["ttft_ms"]["p90"], "E2E mean": lambda s: s["e2e_ms"]["mean"],
           "E2E p90": lambda s: s["e2e_ms"]["p90"], "CPU/token": lambda s: s["cpu_ms_per_token"]}


def ratios(result: dict[str, Any], system: str, base: str, c: int, figure: str) -> list[float]:
    """`figure` of `system` over `base`'s, round by round (the two ran back to back)."""
    f = FIGURES[figure]
    return [f(a) / f(b) for a, b in zip(result["runs"][system][str(c)], result["runs"][base][str(c)])]


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    """The median, and the range over the rounds."""
    med = fmt.format(float(np.median(xs)))
    return med if len(xs) == 1 else f"{med} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def markdown(result: dict[str, Any], name: str) -> str:
    """One folder's table (medians over the rounds, with their range) and the ratios to vLLM."""
    systems, conc, rounds = result["systems"], result["concurrency"], result["rounds"]
    lines = [f"#### {name}", "", "| concurrency | system | out tok/s | TTFT mean / p90 ms | E2E mean / p90 ms | "
             "CPU ms / token | load (1 min) |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in conc:
        for s in systems:
            runs = result["runs"][s][str(c)]

            def med(figure: str) -> str:
                return f"{np.median([FIGURES[figure](r) for r in runs]):.0f}"
            cpu = np.median([r["cpu_ms_per_token"] for r in runs])
            lines.append(f"| {c} | {s} | {med('tok/s')} | {med('TTFT mean')} / {med('TTFT p90')} | "
                         f"{med('E2E mean')} / {med('E2E p90')} | {cpu:.2f} | "
                         f"{np.mean([r['load_1min'] for r in runs]):.1f} |")
    lines.append("")
    if "vllm" in systems:
        lines += [f"Ratios to vLLM, round by round: median (range over {rounds} rounds); tokens/s above 1 is faster, "
                  "latency and CPU time per token below 1 are faster.", "",
                  "| concurrency | system | out tok/s | TTFT mean | TTFT p90 | E2E mean | E2E p90 | CPU / token | "
                  "greedy tokens equal |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c in conc:
            for s in (s for s in systems if s != "vllm"):
                same = result["greedy_matches"][f"{s}/vllm"][str(c)]
                lines.append(f"| {c} | {s} / vllm | " + " | ".join(spread(ratios(result, s, "vllm", c, f))
                                                                     for f in FIGURES)
                             + f" | {sum(same)} / {len(same) * result['requests']} |")
        lines.append("")
    return "\n".join(lines)


# --- a Llama-shaped model with random weights --------------------------------------------------

def random_llama(out: Path, tokenizer_folder: Path, *, n_layer: int = 4, n_embd: int = 512, n_head: int = 8,
                 n_kv_head: int = 2, seed: int = 0) -> Path:
    """A LlamaForCausalLM folder with random weights (transformers' initialization, seeded), GQA
    and an untied head, written by `save_pretrained` beside the tokenizer files of
    `tokenizer_folder` (an export-hf folder), whose vocabulary and context it takes."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    src = json.loads((tokenizer_folder / "config.json").read_text())
    vocab, context = src["vocab_size"], src.get("n_positions") or src["max_position_embeddings"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=3 * n_embd,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                         max_position_embeddings=context, rope_theta=500000.0, tie_word_embeddings=False,
                         bos_token_id=src.get("bos_token_id"), eos_token_id=src.get("eos_token_id"))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_folder / name).exists():
            shutil.copyfile(tokenizer_folder / name, out / name)
    return out
