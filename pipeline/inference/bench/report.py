"""The benchmark's report: bench.md (a table per rate, and the speedups over naive decoding and
HF `generate` at the all-at-once load), throughput.png and latency.png. The targets those
speedups are read against are in docs/inference.md, not here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.figures import pyplot, save_figure

BASELINES = ("naive", "hf_generate")  # what the batching engines are compared against
BATCHING = ("continuous", "paged_prefix")


def rate_label(rate: str) -> str:
    return "all at once" if math.isinf(float(rate)) else f"{float(rate):g} req/s"


def speedups(results: dict[str, dict[str, Any]], rate: str) -> list[str]:
    """Output tokens/s of each batching engine over each baseline, at `rate`."""
    tps = {s: r[rate]["output_tokens_per_s"] for s, r in results.items() if rate in r}
    return [f"- {system} / {base} output tokens/s: **{tps[system] / tps[base]:.1f}x**"
            for base in BASELINES for system in BATCHING if system in tps and base in tps]


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
    if burst is not None:
        lines += ["## Speedups, all at once", "", *(speedups(results, burst) or ["(no pair of systems to compare)"]),
                  "", "The targets are in docs/inference.md (\"Targets\").", ""]
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
    """throughput.png: output tokens/s of each system, a group of bars per request rate (the
    systems and the rates are categories, so no line joins them); latency.png: TTFT, TPOT and E2E
    p50 and p99 per system at the heaviest load."""
    plt = pyplot()

    results, rates = report["results"], [str(r) for r in report["config"]["rates"]]
    systems = list(results)
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, system in enumerate(systems):
        xs = np.arange(len(rates)) + (j - (len(systems) - 1) / 2) * width
        ax.bar(xs, [results[system][r]["output_tokens_per_s"] for r in rates], width=width, label=system)
    ax.set_xticks(range(len(rates)), [rate_label(r) for r in rates])
    ax.set_yscale("log")
    ax.set_xlabel("request rate (Poisson arrivals)")
    ax.set_ylabel("output tokens / s (log)")
    ax.set_title(f"{report['model']}: throughput against load")
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, out / "throughput.png")

    heaviest = rates[-1]
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
    save_figure(fig, out / "latency.png")
