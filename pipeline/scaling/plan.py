"""scaling-plan: the sweep's runs, their token budgets, and what the sweep costs.

The sweep itself is designed in `pipeline/scaling/sweep.py`.

    python -m pipeline scaling-plan --configfile workflow/configs/cluster.yaml

prints the run table, the run count and the estimated GPU-hours at `scaling.mfu` of
`scaling.peak_flops`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.scaling.sweep import plan_sweep, sweep_pretrain

ROOT = Path(__file__).resolve().parent.parent.parent  # the workflow folder: config.yaml


def cost(plan: list[dict[str, Any]], *, peak_flops: float, mfu: float) -> dict[str, float]:
    """Total FLOPs (the model's own count, attention included) and GPU-hours at `mfu` of `peak_flops`."""
    flops = sum(r["flops_model"] for r in plan)
    return {"runs": len(plan), "flops": flops, "gpu_hours": flops / (peak_flops * mfu) / 3600}


def format_plan(plan: list[dict[str, Any]], scaling: dict[str, Any]) -> str:
    est = cost(plan, peak_flops=scaling["peak_flops"], mfu=scaling["mfu"])
    lines = [f"{'budget':>10} {'size':>12} {'N':>12} {'steps':>8} {'tokens D':>14} {'D/N':>8} "
             f"{'6ND':>10} {'GPU-h':>8}"]
    for r in plan:
        hours = r["flops_model"] / (scaling["peak_flops"] * scaling["mfu"]) / 3600
        lines.append(f"{r['budget']:>10} {r['size']:>12} {r['params']:>12,} {r['steps']:>8,} {r['tokens']:>14,} "
                     f"{r['tokens'] / r['params']:>8.2f} {r['flops_6nd']:>10.3g} {hours:>8.3g}")
    lines.append(f"{est['runs']} runs, {est['flops']:.3g} training FLOPs (model count, attention included); "
                 f"~{est['gpu_hours']:,.1f} GPU-hours at {scaling['mfu']:.0%} MFU of {scaling['peak_flops']:.3g} "
                 f"FLOP/s per GPU (N = {scaling['params']} parameters)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configfile", nargs="*", default=[],
                        help="config files over config.yaml, as Snakemake's --configfile (later ones win)")


def load_with(configfiles: list[str]) -> dict[str, Any]:
    """config.yaml, then each file over it as Snakemake merges them, validated with defaults filled."""
    import yaml
    from snakemake.utils import update_config

    from pipeline.config import validate_config
    config: dict[str, Any] = {}
    for path in [ROOT / "config.yaml", *configfiles]:
        update_config(config, yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
    return validate_config(config)


def run(args: argparse.Namespace) -> int:
    config = load_with(args.configfile)
    plan = plan_sweep(config["scaling"], sweep_pretrain(config), config["tokenizer"]["vocab_size"])
    print(format_plan(plan, config["scaling"]))
    return 0
