"""The scaling sweep's design: which (budget, size) runs it trains and each run's pretrain config
(`scaling-plan` prints it, rules/scaling.smk trains it, the scaling fit reads it back).

IsoFLOP design (Hoffmann et al. 2022, approach 2): for each compute budget C in `scaling.budgets`,
each model size trains on D = C / (6 N) tokens, with N the parameter count named by
`scaling.params`. A run is an ordinary pretrain job of max_steps = round(D / global_batch_tokens)
optimizer steps (at least 1), so its actual D = max_steps x global_batch_tokens differs from the
design by under half a batch; the plan records both, and the fit uses the actual D each run's
manifest reports. Explicit runs (`scaling.runs`: size and tokens) are planned the same way.

N here comes from a model built on the meta device (no memory, no init), with the vocabulary of
`tokenizer.vocab_size`; the fit reads the trained model's own counts from its manifest.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from pipeline.config import ConfigError

MIN_SIZES_PER_BUDGET = 3  # an IsoFLOP parabola needs three points
MIN_BUDGETS = 2  # a power law through the IsoFLOP minima, and D varied at all, need two


def budget_label(flops: float) -> str:
    """A budget's folder name and wildcard: 3e+11 -> '3e11', 1.5e17 -> '1.5e17'."""
    mantissa, exponent = f"{flops:.6e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def tokens_label(tokens: int) -> str:
    """An explicit run's 'budget' folder: its token count, e.g. 'D200000'."""
    return f"D{tokens}"


@functools.cache
def model_counts(size: str, vocab_size: int, seq_len: int, rope: bool, architecture: str = "gpt2",
                 n_kv_head: int | None = None) -> dict[str, int]:
    """Parameters (total, non-embedding) and training FLOPs per token of a size as pretrain builds
    it, counted by the model itself (pipeline/model/gpt.py) on the meta device."""
    import torch

    from pipeline.model.gpt import GPT, GPTConfig
    cfg = dict(seq_len=seq_len, rope=rope, architecture=architecture, n_kv_head=n_kv_head, dropout=0.0)
    with torch.device("meta"):
        model = GPT(GPTConfig.for_pretrain(size, cfg, vocab_size))
    return {"total": model.num_params(), "non_embedding": model.num_params(non_embedding=True),
            "flops_per_token": model.flops_per_token()}


def check_sweep(scaling: dict[str, Any]) -> None:
    """Refuse a sweep a fit cannot use, naming what is missing."""
    budgets, runs = scaling["budgets"], scaling["runs"]
    if not budgets and not runs:
        raise ConfigError("config key 'scaling.budgets': no budgets and no scaling.runs; the sweep is empty")
    for i, budget in enumerate(budgets):
        if len(set(budget["sizes"])) < MIN_SIZES_PER_BUDGET:
            raise ConfigError(f"config key 'scaling.budgets.{i}.sizes': budget {budget['flops']:g} FLOPs has "
                              f"{len(set(budget['sizes']))} distinct size(s) {budget['sizes']}; an IsoFLOP curve "
                              f"needs at least {MIN_SIZES_PER_BUDGET} sizes bracketing the optimum")
    labels = [budget_label(b["flops"]) for b in budgets]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"config key 'scaling.budgets': the same budget twice ({labels})")
    if budgets and len(budgets) < MIN_BUDGETS:
        raise ConfigError(f"config key 'scaling.budgets': one budget ({labels[0]} FLOPs); the fit needs at "
                          f"least {MIN_BUDGETS} compute budgets, to vary D and to fit the IsoFLOP minima")
    if runs:
        sizes, tokens = {r["size"] for r in runs}, {r["tokens"] for r in runs}
        if len(sizes) < 2 or len(tokens) < 2:
            raise ConfigError(f"config key 'scaling.runs': {len(sizes)} size(s) and {len(tokens)} token "
                              f"count(s); the fit needs at least 2 of each")


def sweep_runs(scaling: dict[str, Any]) -> list[tuple[str, str]]:
    """The sweep's (budget label, size) pairs, checked, in config order: what Snakemake fans out.
    Needs no model (and no torch), so building the DAG stays quick."""
    check_sweep(scaling)
    keys = [(budget_label(b["flops"]), size) for b in scaling["budgets"] for size in dict.fromkeys(b["sizes"])]
    keys += [(tokens_label(r["tokens"]), r["size"]) for r in scaling["runs"]]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"config key 'scaling.runs': a run repeats another ({keys})")
    return keys


def plan_sweep(scaling: dict[str, Any], pretrain: dict[str, Any], vocab_size: int) -> list[dict[str, Any]]:
    """One record per run: budget label, size, design N / D / C, max_steps, actual D and 6ND.

    `pretrain` is the pretrain section the runs use (with scaling.pretrain's overrides applied)."""
    batch = pretrain["global_batch_tokens"]
    design = {(budget_label(b["flops"]), size): (float(b["flops"]), None)
              for b in scaling["budgets"] for size in b["sizes"]}
    design |= {(tokens_label(r["tokens"]), r["size"]): (None, r["tokens"]) for r in scaling["runs"]}
    plan = []
    for label, size in sweep_runs(scaling):
        flops, tokens = design[label, size]
        try:
            counts = model_counts(size, vocab_size, pretrain["seq_len"], pretrain["rope"], pretrain["architecture"],
                                  pretrain["n_kv_head"])
        except ValueError as e:
            raise ConfigError(f"config key 'scaling': {e}") from e
        n = counts[scaling["params"]]
        design_tokens = flops / (6 * n) if flops is not None else tokens
        steps = max(1, round(design_tokens / batch))
        plan.append({"budget": label, "size": size, "flops": flops, "params": n,
                     "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
                     "design_tokens": design_tokens, "steps": steps, "tokens": steps * batch,
                     "flops_6nd": 6 * n * steps * batch,
                     "flops_model": counts["flops_per_token"] * steps * batch,
                     "warmup_steps": math.ceil(scaling["warmup_fraction"] * steps)})
    return plan


def run_config(pretrain: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The pretrain section one sweep run trains with: its schedule fitted to its token budget."""
    return {**{k: v for k, v in pretrain.items() if k != "sizes"},
            "max_steps": run["steps"], "warmup_steps": run["warmup_steps"]}


def sweep_pretrain(config: dict[str, Any]) -> dict[str, Any]:
    """The pretrain section with scaling.pretrain's overrides, validated (`sizes` left out: the
    sweep names its own, and a change to pretrain.sizes must not rerun it; `nodes` left out: each
    sweep run is a one-node torchrun, however many nodes the pretrain jobs span)."""
    from pipeline.config import section_config
    merged = {**config["pretrain"], **config["scaling"]["pretrain"]}
    return section_config("pretrain", {k: v for k, v in merged.items() if k not in ("sizes", "nodes")})
