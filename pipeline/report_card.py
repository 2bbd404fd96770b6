"""report-card: the run on one static page, read top to bottom, from the stage manifests.

    python -m pipeline report-card --out results/sample/report \\
        --data results/sample/data/manifest.json --tokenizer results/sample/tokenizer/manifest.json \\
        --pretrain results/sample/pretrain/tiny/manifest.json --eval results/sample/eval/tiny/manifest.json \\
        --grpo results/sample/grpo/tiny/manifest.json --inference results/sample/inference_bench/tiny/manifest.json \\
        --scaling results/sample/scaling/manifest.json --tables results/sample/eval/tiny/eval.md ...

Writes <out>/index.html: the data funnel with its drop reasons, tokenizer compression against
GPT-2, the pretraining loss curves, the eval table with intervals and forgetting, GRPO's rewards,
the inference benchmark, and the scaling fit with its prediction check. Every artifact is read
through the manifest of the stage that wrote it and checked against the sha256 recorded there
(`read_checked`); each table and figure names that artifact and its sha256, and the last section
lists every one. Plots are embedded as data URIs, so index.html is one self-contained file: it
opens from disk or a copy, and in `snakemake --report report.html` (Snakemake takes a folder result
with `htmlindex` only into a .zip report).

Each Markdown table named by --tables (drop_report.md, compression.md, eval.md, bench.md, fit.md,
samples.md) also becomes an HTML page, <out>/tables/<its path in the run folder>.html (see
`table_page`), which the Snakemake report shows inline (it offers .md files only as downloads).

Stages add fields over time (intervals, forgetting, a fit's identification and prediction): each
renderer below shows what its artifact holds and says "not available" for what it lacks. A metric
is a plain number or {"value", "ci95", "n", "method"}; an interval is printed beside its value.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_text, read_checked, read_manifest, upstream_manifest, write_manifest

log = logging.getLogger(__name__)

NA = '<span class="na">not available</span>'
ROW_NAMES = {"pretrain": "base", "sft": "SFT", "grpo": "GRPO"}  # the eval table's models in training order, as eval.md names them
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1120px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #d4d4d4; padding: .25em .55em; vertical-align: top; }
th { background: #f2f2f2; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ci { color: #666; } .na { color: #888; font-style: italic; }
.source { color: #666; font-size: .8em; margin: .1em 0 1.2em; word-break: break-all; }
.warn { background: #fff4e0; border-left: 4px solid #e69500; padding: .4em .8em; }
.ok { background: #eaf6ea; border-left: 4px solid #3a9a3a; padding: .4em .8em; }
figure { margin: .8em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: .9em; } code { font-size: .92em; } pre { background: #f7f7f7; padding: .6em; overflow-x: auto; }
"""


# --- reading: every artifact through its manifest ----------------------------------------------------

@dataclass(frozen=True)
class Artifact:
    """A file the card read: its bytes, its path as printed (relative to the run folder), its sha256
    and the manifest that recorded it (None for a manifest itself)."""
    name: str
    sha256: str
    manifest: str | None
    data: bytes


class Reader:
    """Reads the run's artifacts, each checked against its manifest, and remembers what it read."""

    def __init__(self, run: Path):
        self.run = run
        self.read: dict[str, Artifact] = {}

    def name(self, path: Path) -> str:
        return os.path.relpath(path, self.run)

    def output(self, manifest: Path, relative: str) -> Artifact | None:
        """The output `relative` (a path in the manifest's folder) of `manifest`, checked against its
        sha256; None when the manifest names no such output (a stage that does not write it yet)."""
        entries = {entry["path"]: entry for entry in read_manifest(manifest)["outputs"]}
        if relative not in entries:
            return None
        path = manifest.parent / relative
        data = read_checked(path, manifest)
        return self._remember(Artifact(self.name(path), entries[relative]["sha256"], self.name(manifest), data))

    def manifest(self, path: Path) -> tuple[dict[str, Any], Artifact]:
        """A manifest's content (counts and metrics are numbers the card shows) and the manifest as
        the artifact they came from."""
        data = path.read_bytes()
        return read_manifest(path), self._remember(Artifact(self.name(path), hashlib.sha256(data).hexdigest(), None, data))

    def markdown(self, path: Path) -> Artifact:
        """A Markdown table, checked against the manifest beside it."""
        manifest = upstream_manifest(path)
        artifact = self.output(manifest, os.path.relpath(path, manifest.parent))
        if artifact is None:
            raise ValueError(f"{path}: not an output named by {manifest}")
        return artifact

    def _remember(self, artifact: Artifact) -> Artifact:
        self.read[artifact.name] = artifact
        return artifact


def load_json(artifact: Artifact | None) -> Any:
    return None if artifact is None else json.loads(artifact.data)


def get(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]...; None where a step is missing (fields differ between versions of a stage)."""
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


# --- rendering: small pieces ---------------------------------------------------------------------------

esc = html.escape


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def number(x: Any, spec: str = ".3f") -> str:
    """A number as text; a bool as yes/no; anything else "not available"."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) and spec.endswith("f"):
        return f"{x:,}"
    return format(x, spec) if is_number(x) else NA


def value(x: Any) -> float | None:
    """The value of a metric: a plain number, or the "value" of {"value", "ci95", ...}."""
    x = x.get("value") if isinstance(x, dict) else x
    return x if is_number(x) else None


def is_metric(x: Any) -> bool:
    """A metric {"value", "ci95", ...} or a paired comparison {"a", "b", "diff", "ci95", "p_value", ...}."""
    return isinstance(x, dict) and ("value" in x or "diff" in x)


def metric(x: Any, spec: str = ".3f") -> str:
    """A metric as text: `0.480 [0.436, 0.524]` with n and method on hover; a paired comparison as
    its signed difference, interval and p-value; a plain number as is."""
    if not is_metric(x):
        return number(x, spec)
    comparison = "value" not in x
    spec = f"+{spec}" if comparison and not spec.startswith("+") else spec
    text = number(x["diff"] if comparison else x["value"], spec)
    ci = x.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        bounds = [format(b, spec) if is_number(b) else "unbounded" for b in ci]
        text += f' <span class="ci">[{bounds[0]}, {bounds[1]}]</span>'
    if comparison and is_number(x.get("p_value")):
        text += f' <span class="ci">p {x["p_value"]:.2g}</span>'
    about = ", ".join(f"{key} {x[key]}" for key in ("n", "method", "test") if key in x)
    return f'<span title="{esc(about)}">{text}</span>' if about else text


def source(*artifacts: Artifact | None) -> str:
    """The line under a table or figure: the artifacts its numbers came from, with their sha256."""
    parts = [f"<code>{esc(a.name)}</code> sha256 <code>{a.sha256}</code>"
             + (f" (checked against <code>{esc(a.manifest)}</code>)" if a.manifest else "")
             for a in artifacts if a is not None]
    return f'<p class="source">from {"; ".join(parts)}</p>' if parts else ""


def table(headers: list[str], rows: list[list[str]], *sources: Artifact | None) -> str:
    """An HTML table (cells already HTML; numbers and "not available" right-aligned)
    and the source line under it."""
    def cell(text: str) -> str:
        numeric = text[:1].isdigit() or text[:1] in "+-—" or text.startswith("<span")
        return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"

    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{source(*sources)}"


def figure(artifact: Artifact | None, caption: str) -> str:
    if artifact is None:
        return f"<p>{esc(caption)}: {NA}</p>"
    uri = "data:image/png;base64," + base64.b64encode(artifact.data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption>'
            f"{source(artifact)}</figure>")


def unavailable(what: str) -> str:
    return f"<p>{esc(what)}: {NA}</p>"


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def flat_rows(obj: Any, spec: str, prefix: str = "") -> list[list[str]]:
    """[name, value] rows of a nested dict whose shape the card does not know: numbers, metrics,
    text and lists as values, nested dicts as `outer · inner` names."""
    if isinstance(obj, dict) and not is_metric(obj):
        return [row for key, item in obj.items()
                for row in flat_rows(item, spec, f"{prefix} · {key}" if prefix else str(key))]
    if isinstance(obj, list):
        shown = "; ".join(number(x, spec) if is_number(x) else esc(str(x)) for x in obj) or "none"
    else:
        shown = esc(obj) if isinstance(obj, str) else metric(obj, spec)
    return [[esc(prefix.replace("_", " ")), shown]]


# --- the sections, in reading order ----------------------------------------------------------------------

def data_funnel(reader: Reader, manifest: Path) -> str:
    """Documents and bytes in and out of each web-data stage, and what each dropped, why."""
    artifact = reader.output(manifest, "drop_report.json")
    report = load_json(artifact)
    if report is None:
        return unavailable("drop_report.json")
    rows = []
    for stage in report.get("stages", []):
        docs_in, docs_out = stage.get("docs_in"), stage.get("docs_out")
        kept = 100 * docs_out / docs_in if is_number(docs_in) and is_number(docs_out) and docs_in else None
        megabytes = [stage[key] / 1e6 if is_number(stage.get(key)) else None for key in ("bytes_in", "bytes_out")]
        dropped = sorted((stage.get("dropped") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
        entry = f" ({stage['entry'].upper()})" if stage.get("entry") not in (None, "shared") else ""
        rows.append([esc(f"{stage.get('name', '?')}{entry}"), number(docs_in), number(docs_out), number(kept, ".1f"),
                     *(number(mb, ".2f") for mb in megabytes),
                     ", ".join(f"{esc(reason)}: {count:,}" for reason, count in dropped) or "none"])
    errors = report.get("input_errors") or []
    body = table(["stage", "docs in", "docs out", "kept %", "MB in", "MB out", "dropped (reason: count)"], rows, artifact)
    if errors:
        body += f"<p>Input errors: {esc('; '.join(map(str, errors)))}</p>"
    body += figure(reader.output(manifest, "plots/funnel.png"), "Documents left after each stage")
    return body + figure(reader.output(manifest, "plots/drop_reasons.png"), "Documents dropped, by stage and reason")


def tokenizer_compression(reader: Reader, manifest: Path) -> str:
    """Bytes per token of our BPE and GPT-2's on held-out text, per source."""
    artifact = reader.output(manifest, "compression.json")
    report = load_json(artifact)
    if report is None:
        return unavailable("compression.json")
    vocab = report.get("vocab_size") or {}
    rows = []
    for name, s in [*(report.get("by_source") or {}).items(), ("total", report.get("total") or {})]:
        ours, gpt2 = s.get("bytes_per_token_ours"), s.get("bytes_per_token_gpt2")
        ratio = ours / gpt2 if is_number(ours) and is_number(gpt2) and gpt2 else None
        rows.append([f"<b>{esc(name)}</b>" if name == "total" else esc(name), number(s.get("documents")),
                     number(s.get("bytes")), number(s.get("tokens_ours")), number(s.get("tokens_gpt2")),
                     number(ours, ".3f"), number(gpt2, ".3f"), number(ratio, ".3f")])
    body = (f"<p>Bytes per token (higher is better) of our tokenizer ({number(vocab.get('ours'))} ids) and GPT-2's "
            f"({number(vocab.get('gpt2'))} ids), on {esc(report.get('text', 'held-out text'))}.</p>")
    return body + table(["source", "documents", "bytes", "tokens (ours)", "tokens (GPT-2)", "bytes/token (ours)",
                         "bytes/token (GPT-2)", "ours / GPT-2"], rows, artifact)


def pretrain_run(reader: Reader, path: Path) -> str:
    """One size: what was trained (the manifest's counts) and the loss curves."""
    manifest, artifact = reader.manifest(path)
    metrics, counts = manifest.get("metrics", {}), manifest.get("counts", {})
    rows = [["parameters", number(metrics.get("params"))], ["steps", number(counts.get("steps"))],
            ["tokens trained", number(counts.get("tokens"))],
            ["final val loss (nats/token)", metric(metrics.get("final_val_loss"), ".4f")]]
    return table(["", "value"], rows, artifact) + figure(reader.output(path, "loss.png"),
                                                         f"{path.parent.name}: train and val loss against step")


def task_cell(task: Any, key: str) -> str:
    """pass@1 or pass@k of one model on one task; a task flagged as not measured says so instead of zeros."""
    if get(task, "measured") is False:
        return '<span class="na">not measured at this scale</span>'
    return metric(get(task, key))


def eval_rows(models: dict[str, dict[str, Any]]) -> list[tuple[str, Callable[[dict], str]]]:
    """(row name, cell of a model's results) of every metric the eval results hold, in the table's
    order: val loss and bpb (overall, then per source), MMLU per shot setting, each task's pass@1
    and pass@k."""
    first = next(iter(models.values()))
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("val loss (nats/token)", lambda r: metric(r.get("val_loss"))), ("bits per byte", lambda r: metric(r.get("bpb")))]
    for src in first.get("by_source") or {}:
        rows += [(f"val loss: {src}", lambda r, s=src: metric(get(r, "by_source", s, "val_loss"))),
                 (f"bpb: {src}", lambda r, s=src: metric(get(r, "by_source", s, "bpb")))]
    for shot, summary in (first.get("mmlu") or {}).items():
        n = f" (n={summary['n']})" if is_number(summary.get("n")) else ""
        rows += [(f"MMLU {shot} {key}{n}", lambda r, s=shot, k=key: metric(get(r, "mmlu", s, k))) for key in ("acc", "acc_norm")]
    for name, task in (first.get("tasks") or {}).items():
        for key, label in (("pass@1", "pass@1 (greedy"), ("pass@k", f"pass@{task.get('k', 'k')} (sampled")):
            n = get(task, key, "n") or task.get("n")
            rows.append((f"{name} {label}{f', n={n}' if is_number(n) else ''})",
                         lambda r, t=name, k=key: task_cell(get(r, "tasks", t), k)))
    return rows


def forgetting(models: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows: the change of val loss vs the base model (forgetting), overall and per source: the
    eval's own paired comparison (`forgetting`, with its interval and p-value) when it gives one,
    else the plain difference of the two val losses in the same eval.json."""
    base = models.get("pretrain")
    if base is None:
        return []
    rows = []
    for source in [None, *(base.get("by_source") or {})]:
        path = ("val_loss",) if source is None else ("by_source", source, "val_loss")
        cells = []
        for name, result in models.items():
            own, a, b = get(result, "forgetting", *path), value(get(base, *path)), value(get(result, *path))
            cells.append("—" if name == "pretrain" else metric(own, "+.3f") if own is not None
                         else number(b - a, "+.3f") if a is not None and b is not None else NA)
        rows.append([f"Δ val loss{': ' + esc(source) if source else ''} vs base (forgetting)", *cells])
    return rows


def eval_table(reader: Reader, path: Path) -> str:
    """One size: base, SFT and GRPO side by side, every metric with its 95% interval where the eval
    gives one, forgetting, and the paired comparisons."""
    artifact = reader.output(path, "eval.json")
    result = load_json(artifact) or {}
    if not result.get("models"):
        return unavailable("eval.json")
    order = list(ROW_NAMES)  # training order (eval.json's keys are sorted by name)
    models = dict(sorted(result["models"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    headers = ["metric", *(ROW_NAMES.get(name, name) for name in models)]
    rows = [[esc(label), *(cell(r) for r in models.values())] for label, cell in eval_rows(models)]
    body = ("<p>Each value with its 95% interval where the eval gives one (hover for n and method). "
            "Forgetting: val loss after post-training minus the base model's.</p>")
    body += table(headers, rows + forgetting(models), artifact)
    if comparisons := result.get("comparisons"):
        # a task at zero for every model compares zeros: left out, as the eval's own table does
        unmeasured = [task for task, flags in (result.get("tasks") or {}).items() if get(flags, "measured") is False]
        rows = [[esc(f"{ROW_NAMES.get(c.get('a'), c.get('a'))} → {ROW_NAMES.get(c.get('b'), c.get('b'))}"),
                 esc(str(c.get("metric", ""))), metric({"value": c.get("diff"), "ci95": c.get("ci95")}, "+.3f"),
                 number(c.get("p_value"), ".3g"), esc(str(c.get("test", ""))), number(c.get("n"))]
                for c in comparisons if str(c.get("metric", "")).split(" ")[0] not in unmeasured]
        left_out = f" Tasks not measured at this scale are left out: {esc(', '.join(unmeasured))}." if unmeasured else ""
        body += f"<p>Paired comparisons on the same items (diff = second minus first).{left_out}</p>"
        body += table(["models", "metric", "diff [95% CI]", "p", "test", "n"], rows, artifact)
    else:
        body += unavailable("Paired comparisons")
    return body + figure(reader.output(path, "eval.png"), f"{path.parent.name}: the eval table as bars")


def grpo_run(reader: Reader, path: Path) -> str:
    """One size: GRPO's reward and held-out accuracy figures (its manifest: accuracy of the SFT
    input and of GRPO, their paired comparison, the items scored) and its rewards plot."""
    manifest, artifact = reader.manifest(path)
    shown = {key: item for key, item in manifest.get("metrics", {}).items()
             if any(word in key for word in ("reward", "accuracy", "scored", "comparison", "held_out"))}
    rows = flat_rows(shown, ".3f")
    return (table(["", "value"], rows or [["rewards and accuracy", NA]], artifact)
            + figure(reader.output(path, "rewards.png"), f"{path.parent.name}: GRPO rewards and rollout statistics per step"))


def ms(stats: Any, *keys: str) -> str:
    return " / ".join(number(get(stats, key), ".1f") for key in keys)


def inference_bench(reader: Reader, path: Path) -> str:
    """One size: every serving system's throughput and latency percentiles at each request rate."""
    artifact = reader.output(path, "bench.json")
    report = load_json(artifact) or {}
    results = report.get("results")
    if not results:
        return unavailable("bench.json")
    body = (f"<p>Device {esc(str(report.get('device', '?')))}, {esc(str(report.get('threads', '?')))} thread(s); "
            f"{esc(str(get(report, 'config', 'workload', 'num_requests') or '?'))} requests per rate.</p>")
    rates = [str(r) for r in get(report, "config", "rates") or []] or sorted({r for s in results.values() for r in s})
    for rate in rates:
        rows = [[esc(system), number(get(m, "output_tokens_per_s"), ".1f"), number(get(m, "requests_per_s"), ".2f"),
                 number(get(m, "goodput_requests_per_s"), ".2f"), ms(get(m, "ttft_ms"), "median", "p99"),
                 ms(get(m, "tpot_ms"), "median", "p99"), ms(get(m, "itl_ms"), "median"),
                 ms(get(m, "e2e_ms"), "median", "p99")]
                for system, per_rate in results.items() if (m := per_rate.get(rate)) is not None]
        label = "all at once" if math.isinf(float(rate)) else f"{float(rate):g} requests/s (Poisson arrivals)"
        body += f"<h4>{esc(label)}</h4>" + table(
            ["system", "out tok/s", "req/s", "goodput req/s", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms",
             "ITL p50 ms", "E2E p50 / p99 ms"], rows, artifact)
    if report.get("skipped"):
        body += "<p>Skipped: " + esc("; ".join(f"{s} ({why})" for s, why in report["skipped"].items())) + "</p>"
    body += figure(reader.output(path, "throughput.png"), f"{path.parent.name}: output tokens/s per system and rate")
    return body + figure(reader.output(path, "latency.png"), f"{path.parent.name}: latency percentiles at the heaviest load")


PARAMS = ("E", "A", "B", "alpha", "beta")


def identification(fit: dict[str, Any]) -> tuple[bool, str]:
    """(identified, the sentence saying so): the fit's own `identified` and `reasons` when it has
    them; without them the fit counts as not identified, naming any parameter at its search bound."""
    reasons = [str(r) for r in fit.get("reasons") or []]
    at_bound = get(fit, "approach3", "at_bound") or []
    if fit.get("identified") is True:
        return True, '<p class="ok">The fit is identified: no parameter at a search bound, every interval finite.</p>'
    if fit.get("identified") is False:
        why = "; ".join(reasons) or "no reason given"
        return False, f'<p class="warn"><b>Not identified</b>: {esc(why)}. Exponents and allocations are not findings.</p>'
    bound = f" The fit ends on the search bounds of {esc(', '.join(map(str, at_bound)))}." if at_bound else ""
    return False, (f'<p class="warn">Identification: {NA} (fit.json has no "identified" field), so exponents and '
                   f"allocations are not shown as findings.{bound}</p>")


PREDICTED = (("best_loss", "best final loss"), ("N_opt", "N*"))  # what the held-out fit predicts, as labelled
HELD_OUT = {"approach3": "held-out fit", "identified": "held-out fit identified", "reasons": "held-out fit: reasons"}


def prediction_check(prediction: Any, artifact: Artifact | None) -> str:
    """The fit from every budget but the largest against that budget's runs: which budgets it saw;
    per quantity, the prediction with its interval (and the size, for a best loss), the measurement
    and whether it falls inside; the prediction's other fields (the held-out fit's parameters and
    verdict) key by key below."""
    if not isinstance(prediction, dict) or not prediction:
        return unavailable("Prediction of the largest budget from the smaller ones")
    held, fitted = prediction.get("heldout_flops"), prediction.get("fitted_budgets")
    named = is_number(held) and isinstance(fitted, list)  # which budgets, said in the sentence below
    which = (f"the fit from the {number(prediction.get('fitted_runs'))} runs at C = "
             f"{esc(', '.join(number(c, '.3g') for c in fitted))} predicts C = {number(held, '.3g')}"
             if named else "the fit from every budget but the largest predicts the largest budget")
    body = (f"<p>Pre-registered: {which}: its best loss over the sizes trained and its N*, from the sizes and "
            "tokens alone; the runs' measurement stands beside it.</p>")
    if prediction.get("made") is False:
        why = "; ".join(map(str, prediction.get("reasons") or [])) or "no reason given"
        body += f'<p class="warn"><b>No prediction made</b>: {esc(why)}.</p>'

    def at(key: str, what: str) -> str:  # the size a best loss was predicted or measured at, where given
        size = get(prediction, key, f"{what}_size")
        return f" ({esc(str(size))})" if size else ""

    rows = [[esc(label), metric(get(prediction, key, "predicted"), ".4g") + at(key, "predicted"),
             metric(get(prediction, key, "measured"), ".4g") + at(key, "measured"),
             number(get(prediction, key, "inside")), esc(str(get(prediction, key, "note") or ""))]
            for key, label in PREDICTED if isinstance(prediction.get(key), dict)]
    if rows:
        body += table(["", "predicted [95% CI]", "measured", "inside the interval", "note"], rows, artifact)
    shown = {*dict(PREDICTED), *(("heldout_flops", "fitted_budgets", "fitted_runs") if named else ())}
    rest = {HELD_OUT.get(key, key): item for key, item in prediction.items() if key not in shown}
    return body + (table(["", "value"], flat_rows(rest, ".4g"), artifact) if rest else "")


def scaling_fit(reader: Reader, manifest: Path) -> str:
    """The approach-3 fit (its parameters with intervals, whether it is identified), the
    pre-registered prediction of the largest budget against its measurement, and the plots."""
    artifact = reader.output(manifest, "fit.json")
    fit = load_json(artifact)
    if fit is None:
        return unavailable("fit.json")
    identified, verdict = identification(fit)
    a3, boot = fit.get("approach3") or {}, get(fit, "bootstrap", "params") or {}
    rows = [[esc(name), metric({"value": a3.get(name), "ci95": boot.get(name)} if name in boot else a3.get(name), ".4g")]
            for name in PARAMS]
    caption = ("Approach 3, L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap 95% intervals" +
               ("." if identified else ": the best fit, for diagnosis only (these runs do not determine it)."))
    body = verdict + f"<p>{caption}</p>"
    body += table(["parameter", "fit [95% CI]"], rows, artifact)
    exponents = fit.get("exponents") or {}
    if identified and exponents:
        body += (f"<p>Compute-optimal exponents: N* ∝ C^{number(exponents.get('N_opt'), '.3f')}, "
                 f"D* ∝ C^{number(exponents.get('D_opt'), '.3f')}.</p>{source(artifact)}")
    body += "<h3>Prediction check</h3>" + prediction_check(fit.get("prediction"), artifact)
    body += figure(reader.output(manifest, "fit.png"), "Approach 3: loss against N per budget, with the fit")
    body += figure(reader.output(manifest, "isoflop.png"), "IsoFLOP curves")
    return body + figure(reader.output(manifest, "frontier.png"), "Compute-optimal frontier")


def artifacts(reader: Reader) -> str:
    rows = [[f"<code>{esc(a.name)}</code>", f"<code>{a.sha256}</code>",
             f"<code>{esc(a.manifest)}</code>" if a.manifest else "(a manifest: its own bytes)"]
            for a in sorted(reader.read.values(), key=lambda a: a.name)]
    body = "<p>Every file this page was read from, checked against the sha256 its stage recorded.</p>"
    return body + table(["artifact", "sha256", "checked against"], rows)


# --- the tables as HTML pages ---------------------------------------------------------------------------

def table_page(md: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Where the HTML page of the Markdown table `md` goes: <out>/tables/<md's path in the run folder,
    .md -> .html> (<out> is the report folder inside the run folder)."""
    relative = Path(os.path.relpath(md, Path(out).parent))
    return Path(out) / "tables" / relative.with_suffix(".html")


def markdown_page(reader: Reader, md: Path) -> str:
    """The Markdown table `md` as an HTML page; images it shows (fit.md's plots) are embedded when
    its manifest names them, else say "not available"."""
    from markdown_it import MarkdownIt

    artifact = reader.markdown(md)
    parser = MarkdownIt("commonmark", {"html": False}).enable("table")  # raw HTML in a sample is shown, not run
    tokens = parser.parse(artifact.data.decode("utf-8"))
    for token in tokens:
        for child in token.children or ():
            if child.type == "image":
                image = reader.output(upstream_manifest(md), str(child.attrGet("src")))
                if image is None:
                    child.type, child.content, child.children = "text", f"(image {child.attrGet('src')}: not available)", None
                else:
                    child.attrSet("src", "data:image/png;base64," + base64.b64encode(image.data).decode("ascii"))
    return page(artifact.name, parser.renderer.render(tokens, parser.options, {}) + source(artifact))


# --- the page --------------------------------------------------------------------------------------------

SECTIONS = {"data": "Data funnel", "tokenizer": "Tokenizer compression vs GPT-2", "pretrain": "Pretraining loss",
            "eval": "Evaluation", "grpo": "GRPO rewards", "inference": "Inference benchmark", "scaling": "Scaling fit",
            "artifacts": "Artifacts"}


def per_run(render: Callable[[Reader, Path], str], reader: Reader, manifest: Path | None, what: str) -> str:
    """A section of the whole run (data, tokenizer, scaling): one manifest, or "not available"."""
    return render(reader, manifest) if manifest else unavailable(what)


def per_size(render: Callable[[Reader, Path], str], reader: Reader, manifests: list[Path], what: str) -> str:
    """One sub-section per model size (the folder of its manifest)."""
    if not manifests:
        return unavailable(what)
    return "".join(f"<h3><code>{esc(path.parent.name)}</code></h3>{render(reader, path)}" for path in manifests)


def render_card(reader: Reader, *, data: Path | None, tokenizer: Path | None, pretrain: list[Path],
                eval: list[Path], grpo: list[Path], inference: list[Path], scaling: Path | None) -> str:
    bodies = {"data": per_run(data_funnel, reader, data, "Drop report"),
              "tokenizer": per_run(tokenizer_compression, reader, tokenizer, "Compression report"),
              "pretrain": per_size(pretrain_run, reader, pretrain, "Pretraining runs"),
              "eval": per_size(eval_table, reader, eval, "Eval results"),
              "grpo": per_size(grpo_run, reader, grpo, "GRPO runs"),
              "inference": per_size(inference_bench, reader, inference, "Benchmark"),
              "scaling": per_run(scaling_fit, reader, scaling, "Scaling fit")}
    bodies["artifacts"] = artifacts(reader)  # last: it lists what the sections above read
    run = reader.run.resolve().name
    contents = "".join(f'<li><a href="#{anchor}">{esc(title)}</a></li>' for anchor, title in SECTIONS.items())
    head = (f"<h1>wetstone report card: run <code>{esc(run)}</code></h1>"
            "<p>The run top to bottom, from raw web text to a served model. Every table and figure names the "
            "artifact it was read from and its sha256, checked against the manifest of the stage that wrote it. "
            f"What a stage does not report yet says {NA}.</p><ol>{contents}</ol>")
    sections = "\n".join(f'<section id="{anchor}"><h2>{esc(SECTIONS[anchor])}</h2>\n{body}\n</section>'
                          for anchor, body in bodies.items())
    return page(f"wetstone report card: {run}", f"{head}\n{sections}")


def report_card(*, out: Path, data: Path | None = None, tokenizer: Path | None = None, pretrain: Iterable[Path] = (),
                eval: Iterable[Path] = (), grpo: Iterable[Path] = (), inference: Iterable[Path] = (),
                scaling: Path | None = None, tables: Iterable[Path] = ()) -> dict[str, Any]:
    """Write <out>/index.html, an HTML page per Markdown table, and <out>/manifest.json; returns the manifest."""
    reader = Reader(out.parent)
    tables = [Path(md) for md in tables]
    manifests = [p for p in (data, tokenizer, *pretrain, *eval, *grpo, *inference, scaling) if p is not None]
    manifests += [m for m in dict.fromkeys(map(upstream_manifest, tables)) if m not in manifests]
    card = render_card(reader, data=data, tokenizer=tokenizer, pretrain=list(pretrain), eval=list(eval),
                       grpo=list(grpo), inference=list(inference), scaling=scaling)
    pages = {table_page(md, out): markdown_page(reader, md) for md in tables}
    for path, text in [(out / "index.html", card), *pages.items()]:
        atomic_write_text(path, text)
    log.info("report card: %d artifacts read, %d table pages; %s", len(reader.read), len(pages), out / "index.html")
    return write_manifest(out / "manifest.json", stage="report_card", config={}, inputs=manifests,
                          outputs={out / "index.html": None, **{path: None for path in pages}},
                          counts={"artifacts": len(reader.read), "tables": len(pages)})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="the report folder inside the run folder (results/<run>/report)")
    parser.add_argument("--data", type=Path, help="the data report's manifest.json (data/manifest.json)")
    parser.add_argument("--tokenizer", type=Path, help="the tokenizer's manifest.json")
    for stage in ("pretrain", "eval", "grpo", "inference"):
        parser.add_argument(f"--{stage}", type=Path, nargs="*", default=[],
                            help=f"the {stage} manifest.json of each model size (<run>/{stage}/<size>/manifest.json)")
    parser.add_argument("--scaling", type=Path, help="the scaling fit's manifest.json")
    parser.add_argument("--tables", type=Path, nargs="*", default=[],
                        help="Markdown tables to render as HTML pages under <out>/tables/ (each checked against "
                             "the manifest beside it)")


def run(args: argparse.Namespace) -> int:
    report_card(out=args.out, data=args.data, tokenizer=args.tokenizer, pretrain=args.pretrain, eval=args.eval,
                grpo=args.grpo, inference=args.inference, scaling=args.scaling, tables=args.tables)
    return 0
