"""What a training run leaves for people: metrics.jsonl, W&B, the loss plot and samples.md.

Only rank 0 calls these.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_text
from pipeline.figures import pyplot, save_figure

log = logging.getLogger(__name__)


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN/inf: a non-finite value is written as null (its event says what happened)."""
    return x if math.isfinite(x) else None


# --- metrics.jsonl and W&B ---------------------------------------------------------------------------

class Metrics:
    """The metrics history, one JSON record per line: training steps (`loss`), evaluations
    (`val_loss`) and events (`event`). Lines are appended to `path` (under checkpoints/, which
    Snakemake never deletes) as training runs, so `tail -f` follows it; on resume the records after
    the checkpoint's step are dropped (those steps run again) and the file is rewritten atomically.
    `export` writes the stage's declared metrics.jsonl from it: a Snakemake rerun deletes that
    output of an incomplete job, but not the history."""

    def __init__(self, path: Path, wandb_run: Any = None):
        self.path, self.wandb_run, self.records = path, wandb_run, []

    def resume(self, step: int) -> None:
        """Keep the records up to `step`; a half-written last line (a crash) is dropped."""
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= step:
                    self.records.append(record)
        self.rewrite()

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None},
                               step=record["step"])

    def rewrite(self, path: Path | None = None) -> None:
        atomic_write_text(path or self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))

    def export(self, path: Path) -> None:
        """The whole history, also into `path` (the stage's metrics.jsonl)."""
        self.rewrite()
        self.rewrite(path)


def init_wandb(project: str, mode: str, out: Path, run_id: str, config: dict[str, Any]) -> Any:
    """A W&B run writing under `out` (never the working directory). WANDB_MODE from the
    environment wins; otherwise the config's mode (default offline) is set. `disabled` returns
    None without importing wandb."""
    mode = os.environ.setdefault("WANDB_MODE", mode)
    if mode == "disabled":
        return None
    import wandb
    return wandb.init(project=project, dir=str(out), id=run_id, name=out.name, resume="allow",
                      config=config)


# --- the loss plot -----------------------------------------------------------------------------------

def plot_losses(records: list[dict[str, Any]], path: Path, title: str,
                baseline: tuple[float, str] | None = None, *, loss_label: str = "cross-entropy (nats/token)",
                val_label: str | None = None) -> None:
    """Train loss (raw and smoothed) and val loss against step, with a (value, label) baseline
    line such as the unigram entropy. `loss_label` names the y axis; a `val_label` says the val
    series is another quantity (GRPO's held-out error rate) and draws it on its own right axis."""
    plt = pyplot()

    # after a watchdog restore some steps ran twice: plot the last run of each
    train = {r["step"]: r["loss"] for r in records if r.get("loss") is not None}
    val = {r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps = sorted(train)
        losses = [train[s] for s in steps]
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        ema, smooth = losses[0], []
        for value in losses:
            ema = 0.9 * ema + 0.1 * value
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", label="train (EMA 0.9)")
    val_ax = ax.twinx() if val_label else ax
    if val:
        val_ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", color="tab:orange", label=val_label or "val")
    if val_label:
        val_ax.set_ylabel(val_label, color="tab:orange")
    if baseline is not None:
        ax.axhline(baseline[0], color="gray", linestyle="--", label=f"{baseline[1]} {baseline[0]:.2f}")
    ax.set(xlabel="step", ylabel=loss_label, title=title)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    more = val_ax.get_legend_handles_labels() if val_ax is not ax else ([], [])
    ax.legend(handles[0] + more[0], handles[1] + more[1])
    fig.tight_layout()
    save_figure(fig, path)


# --- decoding and samples --------------------------------------------------------------------------------

def load_decoder(spec: str | None) -> Callable[[list[int]], str] | None:
    """ids -> text: `spec` is our tokenizer.json (the `tokenizer` stage's output) or a tiktoken
    encoding name such as gpt2; None when there is none (samples then show ids). Called before
    training starts, so a typo fails at once, not after the last step."""
    if spec is None:
        return None
    if Path(spec).exists():
        from pipeline.artifacts import check_inputs
        from pipeline.tokenizer import BPETokenizer
        check_inputs(spec, required=False)  # the tokenizer stage's, by its manifest; one made by hand as is
        try:
            return BPETokenizer.load(spec).decode
        except Exception as e:
            raise ValueError(f"--tokenizer {spec}: not a readable tokenizer.json ({type(e).__name__}: {e})") from e
    import tiktoken
    if spec not in tiktoken.list_encoding_names():
        raise ValueError(f"--tokenizer {spec!r}: no such file, and not a tiktoken encoding "
                         f"({', '.join(tiktoken.list_encoding_names())})")
    encoding = tiktoken.get_encoding(spec)
    return lambda ids: encoding.decode([i for i in ids if i < encoding.n_vocab])


def write_samples(path: Path, samples: list[dict[str, Any]], decode: Callable[[list[int]], str] | None,
                  header: str) -> None:
    """samples.md: for each prompt, the greedy and the top-p continuation (text, or ids)."""
    lines = [f"# Samples\n\n{header}\n"]
    for i, sample in enumerate(samples, 1):
        lines.append(f"## Prompt {i}\n")
        for key in ("prompt", "greedy", "top_p"):
            ids = sample[key]
            shown = decode(ids) if decode else " ".join(map(str, ids))
            lines.append(f"**{key}** ({len(ids)} tokens):\n\n```text\n{shown}\n```\n")
    atomic_write_text(path, "\n".join(lines))
