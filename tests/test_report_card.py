"""The report card (pipeline/report_card.py): one page from the stage manifests, every number
naming its artifact and sha256, rendered in headless Chromium; the stages' Markdown tables as HTML
pages; and both in `snakemake --report`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from browser import chromium, rendered_dom, run_chromium
from conftest import ROOT
from pipeline.__main__ import main
from pipeline.artifacts import (ChangedInput, atomic_write_json, manifest_entry, read_manifest, sha256_file,
                                write_manifest)
from pipeline.report_card import report_card, table_page



def m(value: float, lo: float, hi: float, n: int, method: str = "wilson") -> dict:
    """A metric with its interval, in the shape the stages share."""
    return {"value": value, "ci95": [lo, hi], "n": n, "method": method}


def png(path: Path, values: list[float], title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 2.5))
    ax.bar(range(len(values)), values, color=["tab:blue", "tab:orange", "tab:green"][: len(values)])
    ax.set_title(title)
    fig.savefig(path, format="png", dpi=60)
    plt.close(fig)
    return path


def stage(folder: Path, name: str, files: dict[str, object], metrics: dict | None = None,
          counts: dict | None = None) -> Path:
    """Write `files` (dict/list: JSON, str: text, Path: already there) into `folder` and the stage's
    manifest naming them, as a stage leaves its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, (dict, list)):
            atomic_write_json(path, content)
        elif isinstance(content, str):
            path.write_text(content)
    write_manifest(folder / "manifest.json", stage=name, config={}, inputs=[],
                   outputs={folder / relative: None for relative in files}, metrics=metrics, counts=counts)
    return folder / "manifest.json"


def c(a: str, b: str, diff: float, lo: float, hi: float, p: float, n: int, test: str = "paired_bootstrap") -> dict:
    """A paired comparison of model b against model a, in the shape the stages share."""
    return {"a": a, "b": b, "diff": diff, "ci95": [lo, hi], "p_value": p, "test": test, "n": n}


def lm(loss: float, web: float, stories: float) -> dict:
    """val loss and bpb overall and per source, each with its bootstrap interval over documents."""
    return {"val_loss": m(loss, loss - 0.07, loss + 0.07, 93, "bootstrap"), "bpb": m(loss / 2.65, 1.5, 1.8, 93, "bootstrap"),
            "by_source": {"tinystories": {"val_loss": m(stories, stories - 0.1, stories + 0.1, 91, "bootstrap"), "bpb": 1.4},
                          "web": {"val_loss": m(web, web - 0.2, web + 0.2, 2, "bootstrap"), "bpb": 2.2}}}


def tasks(pass1: dict, passk: dict) -> dict:
    return {"arithmetic": {"pass@1": pass1, "pass@k": passk, "k": 8, "measured": True},
            "gsm8k": {"pass@1": m(0.0, 0.0, 0.074, 50), "pass@k": m(0.0, 0.0, 0.0, 50, "bootstrap"), "k": 8,
                      "measured": False}}


def forgetting(base: dict, model: dict, name: str) -> dict:
    """The eval's forgetting of `model` vs `base`: paired comparisons of val loss, overall and per source."""
    def change(a: dict, b: dict) -> dict:
        diff = b["value"] - a["value"]
        return c("pretrain", name, diff, diff - 0.04, diff + 0.04, 0.001, 93)
    return {"val_loss": change(base["val_loss"], model["val_loss"]),
            "by_source": {s: {"val_loss": change(base["by_source"][s]["val_loss"], model["by_source"][s]["val_loss"])}
                          for s in base["by_source"]}}


# eval.json in the eval stage's shape: metrics with intervals, per source, forgetting, comparisons
MMLU = {"0-shot": {"acc": m(0.262, 0.21, 0.32, 200), "acc_norm": m(0.251, 0.2, 0.31, 200), "n": 200, "chance": 0.25}}
EVAL_MODELS = {
    "pretrain": {**lm(4.281, 5.904, 3.995), "mmlu": MMLU,
                 "tasks": tasks(m(0.0, 0.0, 0.0076, 500), m(0.014, 0.006, 0.028, 100, "bootstrap"))},
    "sft": {**lm(4.517, 6.02, 4.236), "mmlu": MMLU,
            "tasks": tasks(m(0.482, 0.438, 0.526, 500), m(0.716, 0.675, 0.754, 100, "bootstrap"))},
    "grpo": {**lm(4.53, 6.1, 4.25), "mmlu": MMLU,
             "tasks": tasks(m(0.522, 0.478, 0.566, 500), m(0.73, 0.69, 0.77, 100, "bootstrap"))},
}
for name in ("sft", "grpo"):
    EVAL_MODELS[name]["forgetting"] = forgetting(EVAL_MODELS["pretrain"], EVAL_MODELS[name], name)
COMPARISONS = [c("pretrain", "sft", 0.482, 0.438, 0.526, 1.2e-30, 500, "mcnemar_exact") | {"metric": "arithmetic pass@1"},
               c("sft", "grpo", 0.04, 0.01, 0.07, 0.03, 500, "mcnemar_exact") | {"metric": "arithmetic pass@1"},
               c("sft", "grpo", 0.0, 0.0, 0.0, 1.0, 50, "mcnemar_exact") | {"metric": "gsm8k pass@1"}]
# fit.json in the scaling fit's shape: identified, with the held-out prediction of the largest budget
FIT = {"approach3": {"E": 1.93, "A": 120.5, "B": 310.2, "alpha": 0.412, "beta": 0.371, "at_bound": []},
       "bootstrap": {"params": {"E": [1.7, 2.1], "A": [60.1, 300.7], "B": [150.0, 800.0], "alpha": [0.3, 0.5],
                                "beta": [0.3, 0.45]}},
       "exponents": {"N_opt": 0.474, "D_opt": 0.526}, "identified": True, "reasons": [],
       "prediction": {"made": True, "identified": True, "reasons": [], "heldout_flops": 1.8e12,
                      "fitted_budgets": [2e11, 6e11], "fitted_runs": 6, "level": 0.95,
                      "best_loss": {"predicted": m(3.912, 3.85, 3.99, 6, "bootstrap"), "predicted_size": "d1w64",
                                    "measured": 3.947, "measured_size": "d1w64", "inside": True},
                      "N_opt": {"predicted": m(51200, 31000, 88000, 6, "bootstrap"), "measured": 58000,
                                "note": "the IsoFLOP vertex", "inside": True}}}
BENCH = {"model": "tiny", "device": "cpu", "threads": 2,
         "config": {"rates": [8, "inf"], "workload": {"num_requests": 32}},
         "results": {system: {rate: {"output_tokens_per_s": tps, "requests_per_s": 1.5, "goodput_requests_per_s": 1.25,
                                     "ttft_ms": {"mean": 12.0, "median": 11.5, "p99": 30.25},
                                     "tpot_ms": {"mean": 2.0, "median": 1.75, "p99": 4.5},
                                     "itl_ms": {"mean": 2.0, "median": 1.5, "p99": 9.0},
                                     "e2e_ms": {"mean": 90.0, "median": 88.5, "p99": 150.0}, "engine": {}}
                              for rate in ("8", "inf")}
                     for system, tps in (("naive", 91.4), ("paged_prefix", 1234.5))},
         "skipped": {"hf_generate": "no exported HF model"}}


@pytest.fixture
def run(tmp_path) -> dict[str, object]:
    """A small run folder: each stage's artifacts and manifest as the stage leaves them."""
    from pipeline.train.report import plot_losses

    run = tmp_path / "results" / "card"
    drop = {"stages": [{"name": "ingest", "entry": "wet", "docs_in": 318, "docs_out": 317, "bytes_in": 2346332, "bytes_out": 2346211,
                        "dropped": {"empty": 1}},
                       {"name": "langid", "docs_in": 317, "docs_out": 69, "bytes_in": 2346211, "bytes_out": 493084,
                        "dropped": {"language_not_kept": 215, "low_confidence": 33}}], "input_errors": []}
    png(run / "data" / "plots" / "funnel.png", [318, 317, 69], "funnel")
    png(run / "data" / "plots" / "drop_reasons.png", [215, 33, 1], "reasons")
    manifests = {"data": stage(run / "data", "data_report", {
        "drop_report.json": drop, "drop_report.md": "# Drop report\n\n| stage | docs in |\n| --- | ---: |\n| ingest | 318 |\n",
        "plots/funnel.png": None, "plots/drop_reasons.png": None})}
    compression = {"by_source": {"web": {"bytes": 8203, "documents": 2, "tokens_ours": 2715, "tokens_gpt2": 1755,
                                         "bytes_per_token_ours": 3.0214, "bytes_per_token_gpt2": 4.6741}},
                   "total": {"bytes": 8203, "documents": 2, "tokens_ours": 2715, "tokens_gpt2": 1755,
                             "bytes_per_token_ours": 3.0214, "bytes_per_token_gpt2": 4.6741},
                   "text": "val documents", "vocab_size": {"ours": 4096, "gpt2": 50257}}
    manifests["tokenizer"] = stage(run / "tokenizer", "tokenizer", {
        "compression.json": compression, "compression.md": "# Compression\n\n| source | bytes |\n|---|---:|\n| web | 8,203 |\n"})
    records = [{"step": s, "loss": 8.0 - s / 50} for s in range(1, 101)] + [{"step": 100, "val_loss": 6.2}]
    plot_losses(records, run / "pretrain" / "tiny" / "loss.png", "tiny")
    samples = "# Samples\n\n**greedy**:\n\n```text\n<script>alert(1)</script> 2 + 3 = 5\n```\n"
    manifests["pretrain"] = stage(run / "pretrain" / "tiny", "pretrain", {"loss.png": None, "samples.md": samples},
                                  metrics={"params": 1350000, "final_val_loss": 4.2817}, counts={"steps": 200, "tokens": 1638400})
    manifests["sft"] = stage(run / "sft" / "tiny", "sft", {"samples.md": samples})
    png(run / "grpo" / "tiny" / "rewards.png", [0.1, 0.4, 0.5], "rewards")
    manifests["grpo"] = stage(run / "grpo" / "tiny", "grpo", {"rewards.png": None, "samples.md": samples},
                              metrics={"final_reward_mean": 0.5625, "arithmetic_accuracy_input": m(0.482, 0.438, 0.526, 500),
                                       "arithmetic_accuracy": m(0.522, 0.478, 0.566, 500),
                                       "arithmetic_comparison": c("input", "grpo", 0.04, 0.01, 0.07, 0.03, 500, "mcnemar_exact"),
                                       "arithmetic_held_out": {"items": 500, "seed": 7, "sha256": "ab" * 32},
                                       "peak_flops": 1e12})
    png(run / "eval" / "tiny" / "eval.png", [4.281, 4.517], "eval")
    eval_json = {"size": "tiny", "models": EVAL_MODELS, "comparisons": COMPARISONS,
                 "tasks": {"arithmetic": {"measured": True}, "gsm8k": {"measured": False, "note": "not measured at this scale"}}}
    manifests["eval"] = stage(run / "eval" / "tiny", "eval", {
        "eval.json": eval_json, "eval.md": "# Eval: `tiny`\n\n| model | val loss |\n|---|---:|\n| base | 4.281 |\n",
        "eval.png": None})
    for name in ("throughput.png", "latency.png"):
        png(run / "inference_bench" / "tiny" / name, [91.4, 1234.5], name)
    manifests["inference"] = stage(run / "inference_bench" / "tiny", "inference_bench", {
        "bench.json": BENCH, "bench.md": "# Inference\n\n| system | out tok/s |\n|---|---:|\n| naive | 91.4 |\n",
        "throughput.png": None, "latency.png": None})
    for name in ("fit.png", "isoflop.png", "frontier.png"):
        png(run / "scaling" / name, [3.9, 3.95], name)
    fit_md = "# Scaling-law fit\n\n| parameter | ours |\n| --- | --- |\n| E | 1.93 |\n\n![Approach 3 fit](fit.png)\n\n![gone](old.png)\n"
    manifests["scaling"] = stage(run / "scaling", "scaling_fit", {
        "fit.json": FIT, "fit.md": fit_md, "fit.png": None, "isoflop.png": None, "frontier.png": None})
    tables = [run / "data" / "drop_report.md", run / "tokenizer" / "compression.md", run / "pretrain" / "tiny" / "samples.md",
              run / "sft" / "tiny" / "samples.md", run / "eval" / "tiny" / "eval.md", run / "inference_bench" / "tiny" / "bench.md",
              run / "scaling" / "fit.md"]
    return {"root": run, "manifests": manifests, "tables": tables}


def card_args(run: dict, **drop) -> list[str]:
    """`python -m pipeline report-card` arguments for the run, less the stages in `drop`."""
    out = run["root"] / "report"
    args = ["report-card", "--out", str(out)]
    for name, path in run["manifests"].items():
        if name != "sft" and name not in drop:
            args += [f"--{name}", str(path)]
    return args + ["--tables", *map(str, run["tables"])]


class Text(HTMLParser):
    """The page's text as a person reads it: no markup, no <style>, a space between elements."""

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], False

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "li", "table", "tr", "td", "th", "figure", "figcaption", "section", "pre"}

    def handle_starttag(self, tag, attrs):
        self.skip = tag in ("style", "script")
        self.parts.append(" " if tag in self.BLOCKS else "")

    def handle_endtag(self, tag):
        self.skip = False
        self.parts.append(" " if tag in self.BLOCKS else "")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def text_of(page: str) -> str:
    parser = Text()
    parser.feed(page)
    return re.sub(r"\s+", " ", "".join(parser.parts))


def eval_numbers() -> list[str]:
    """The eval table's numbers as the card prints them: value [interval] of each metric."""
    shown = []
    for model in EVAL_MODELS.values():
        for metric in (model["val_loss"], model["bpb"], model["mmlu"]["0-shot"]["acc"],
                       model["tasks"]["arithmetic"]["pass@1"], model["tasks"]["arithmetic"]["pass@k"],
                       *(s["val_loss"] for s in model["by_source"].values())):
            lo, hi = metric["ci95"]
            shown.append(f"{metric['value']:.3f} [{lo:.3f}, {hi:.3f}]")
    return shown


def test_the_card_shows_every_section_with_intervals_and_names_each_artifact(run):
    assert main(card_args(run)) == 0
    out = run["root"] / "report"
    page = (out / "index.html").read_text()
    text = text_of(page)
    for number in eval_numbers():
        assert number in text, number
    assert "metric base SFT GRPO" in text  # in training order, though eval.json's keys are sorted
    # forgetting: the eval's own paired comparisons, overall and per source, with interval and p-value
    assert "Δ val loss vs base (forgetting) — +0.236 [+0.196, +0.276] p 0.001 +0.249 [+0.209, +0.289] p 0.001" in text
    assert "Δ val loss: web vs base (forgetting) — +0.116 [+0.076, +0.156] p 0.001" in text
    assert "gsm8k pass@1 (greedy, n=50) not measured at this scale" in text  # flagged, not drawn as zeros
    assert "arithmetic pass@8 (sampled, n=100) 0.014 [0.006, 0.028]" in text
    assert "base → SFT arithmetic pass@1 +0.482 [+0.438, +0.526] 1.2e-30 mcnemar_exact 500" in text
    assert "SFT → GRPO arithmetic pass@1 +0.040 [+0.010, +0.070] 0.03 mcnemar_exact 500" in text
    assert "gsm8k pass@1 +0.000" not in text and "Tasks not measured at this scale are left out: gsm8k." in text
    assert "ingest (WET) 318 317 99.7 2.35 2.35 empty: 1" in text  # the funnel with its drop reasons
    assert "langid 317 69 21.8 2.35 0.49 language_not_kept: 215, low_confidence: 33" in text
    assert "web 2 8,203 2,715 1,755 3.021 4.674 0.646" in text  # compression vs GPT-2
    assert "final val loss (nats/token) 4.2817" in text and "tokens trained 1,638,400" in text
    # GRPO: held-out accuracy of its input and its own, paired, on the recorded items
    assert "arithmetic accuracy 0.522 [0.478, 0.566] arithmetic accuracy input 0.482 [0.438, 0.526]" in text
    assert "arithmetic comparison +0.040 [+0.010, +0.070] p 0.03" in text and "arithmetic held out · items 500" in text
    assert "peak flops" not in text  # GRPO's section shows rewards and accuracy, not its FLOP counts
    assert "paged_prefix 1234.5 1.50 1.25 11.5 / 30.2 1.8 / 4.5 1.5 88.5 / 150.0" in text
    assert "all at once" in text and "8 requests/s" in text and "hf_generate (no exported HF model)" in text
    assert "The fit is identified" in text and "N* ∝ C^0.474" in text
    assert "alpha 0.412 [0.3, 0.5]" in text
    assert "the fit from the 6 runs at C = 2e+11, 6e+11 predicts C = 1.8e+12" in text
    assert "best final loss 3.912 [3.85, 3.99] (d1w64) 3.947 (d1w64) yes" in text  # predicted, measured, inside
    assert "N* 5.12e+04 [3.1e+04, 8.8e+04] 5.8e+04 yes the IsoFLOP vertex" in text
    assert "heldout flops" not in text and "held-out fit identified yes" in text  # the budgets are in the sentence
    assert page.count('<img src="data:image/png;base64,') == 10  # every plot embedded: one file to open
    # every table and figure names the artifacts it came from, with the sha256 its manifest recorded
    sources = re.findall(r'<p class="source">from (.*?)</p>', page)
    assert len(sources) >= 20
    for line in sources:
        named = re.findall(r"<code>([^<]+)</code> sha256 <code>([0-9a-f]{64})</code>"
                           r"(?: \(checked against <code>([^<]+)</code>\))?", line)
        assert named, line
        for name, sha, manifest in named:
            path = run["root"] / name
            recorded = manifest_entry(path, run["root"] / manifest)["sha256"] if manifest else sha256_file(path)
            assert recorded == sha, (name, line)
    assert "eval/tiny/eval.json" in text and "scaling/fit.json" in text and "grpo/tiny/manifest.json" in text
    manifest = read_manifest(out / "manifest.json")
    assert {e["path"] for e in manifest["outputs"]} == {"index.html", *(str(table_page(md, out).relative_to(out))
                                                                       for md in run["tables"])}
    assert str(run["manifests"]["sft"]) in {e["path"] for e in manifest["inputs"]}  # its samples.md was read
    before = (out / "index.html").read_bytes()
    assert main(card_args(run)) == 0 and (out / "index.html").read_bytes() == before  # same inputs, same bytes


def test_fields_a_stage_does_not_write_say_not_available(run):
    """Today's shapes (plain numbers, no identification, no prediction) and stages left out render:
    what is there is shown, the rest says "not available"; an unidentified fit prints no exponent."""
    eval_json = run["root"] / "eval" / "tiny" / "eval.json"
    plain = {name: {"val_loss": r["val_loss"]["value"], "bpb": r["bpb"]["value"],
                    "by_source": {s: {"val_loss": v["val_loss"]["value"]} for s, v in r["by_source"].items()},
                    "mmlu": {"0-shot": {"acc": 0.25, "acc_norm": 0.25, "n": 20, "chance": 0.25}},
                    "tasks": {"arithmetic": {"pass@1": 0.35 if name == "sft" else 0.0, "pass@k": 0.5, "k": 8, "n": 20}}}
             for name, r in EVAL_MODELS.items()}
    fit = {key: value for key, value in FIT.items() if key not in ("identified", "reasons", "prediction")}
    fit["approach3"] = {**FIT["approach3"], "alpha": 2.0, "at_bound": ["alpha"]}
    files = {"eval.json": {"size": "tiny", "models": plain}, "eval.md": (eval_json.parent / "eval.md").read_text()}
    stage(eval_json.parent, "eval", files)  # no eval.png any more
    stage(run["root"] / "scaling", "scaling_fit", {"fit.json": fit, "fit.md": "# fit\n"})
    run["tables"].remove(run["root"] / "scaling" / "fit.md")
    assert main(card_args(run, grpo=True, inference=True)) == 0
    text = text_of((run["root"] / "report" / "index.html").read_text())
    assert "val loss (nats/token) 4.281 4.517 4.530" in text
    assert "Δ val loss vs base (forgetting) — +0.236 +0.249" in text  # computed from the two val losses
    assert "Δ val loss: web vs base (forgetting) — +0.116 +0.196" in text
    assert "arithmetic pass@1 (greedy, n=20) 0.000 0.350 0.000" in text
    assert "Paired comparisons: not available" in text
    assert "the eval table as bars: not available" in text
    assert "GRPO runs: not available" in text and "Benchmark: not available" in text
    assert 'Identification: not available (fit.json has no "identified" field)' in text
    assert "search bounds of alpha" in text and "N* ∝" not in text
    assert "Prediction of the largest budget from the smaller ones: not available" in text

    fit.update(identified=False, reasons=["alpha at its bound 2.0", "A's interval unbounded"], exponents=None,
               prediction={"made": False, "identified": False, "reasons": ["2 budget(s): the held-out fit needs 2 "
                                                                           "besides the largest"]})
    fit["bootstrap"]["params"]["A"] = [4.5e-5, None]
    stage(run["root"] / "scaling", "scaling_fit", {"fit.json": fit})
    assert main(card_args(run)) == 0
    text = text_of((run["root"] / "report" / "index.html").read_text())
    assert "Not identified: alpha at its bound 2.0; A's interval unbounded" in text and "N* ∝" not in text
    assert "the best fit, for diagnosis only" in text and "A 120.5 [4.5e-05, unbounded]" in text
    assert "No prediction made: 2 budget(s): the held-out fit needs 2 besides the largest." in text


def test_a_changed_artifact_stops_the_card_naming_it(run):
    eval_json = run["root"] / "eval" / "tiny" / "eval.json"
    eval_json.write_text(eval_json.read_text().replace("4.281", "4.181"))
    with pytest.raises(ChangedInput, match=f"{eval_json}: sha256 differs from {eval_json.with_name('manifest.json')}"):
        main(card_args(run))
    assert not (run["root"] / "report" / "index.html").exists()


def test_each_markdown_table_becomes_an_html_page(run):
    assert main(card_args(run)) == 0
    out = run["root"] / "report"
    assert table_page(run["root"] / "eval" / "tiny" / "eval.md", out) == out / "tables" / "eval" / "tiny" / "eval.html"
    eval_page = (out / "tables" / "eval" / "tiny" / "eval.html").read_text()
    assert "<table>" in eval_page and "<td>base</td>" in eval_page and "eval/tiny/eval.md</code> sha256" in eval_page
    fit = (out / "tables" / "scaling" / "fit.html").read_text()
    assert fit.count('src="data:image/png;base64,') == 1  # fit.png, named by the manifest, is embedded
    assert "(image old.png: not available)" in fit  # an image the manifest does not name is not read
    samples = (out / "tables" / "sft" / "tiny" / "samples.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in samples and "<script>" not in samples  # model text is text


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="chromium is absent: install Debian's chromium "
                                                 "(workflow/ci/install_chromium.sh; CI does)")
def test_the_card_renders_in_chromium_with_the_eval_numbers_in_its_text(run, tmp_path):
    from PIL import Image, ImageStat

    assert main(card_args(run)) == 0
    url = (run["root"] / "report" / "index.html").as_uri()
    text = text_of(rendered_dom(url))
    for number in eval_numbers():
        assert number in text, number
    shot = tmp_path / "card.png"
    run_chromium(url, f"--screenshot={shot}", "--hide-scrollbars")
    assert shot.exists()
    image = Image.open(shot).convert("RGB")
    stddev = ImageStat.Stat(image.convert("L")).stddev[0]
    colours = len(image.getcolors(maxcolors=1 << 20) or ())
    assert stddev > 10 and colours > 50, (stddev, colours)  # text, tables and plots (a blank page: 0 and 1)


@pytest.mark.slow
def test_snakemake_report_holds_the_card_and_every_table(run, tmp_path):
    """The rule's job writes what the pipeline's rule declares, and `snakemake --report` takes the
    card and each table page as results (an .html report: the card is one self-contained file)."""
    config = tmp_path / "card.yaml"
    config.write_text(json.dumps({"results": str(tmp_path / "results"), "run": "card"}))
    # the card's inputs are all there (built above): run only its job, then the report
    common = [sys.executable, "-m", "snakemake", "report_card", "--cores", "1", "--allowed-rules", "report_card",
              "--configfile", str(config)]
    result = subprocess.run(common, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = run["root"] / "report"
    assert (out / "index.html").exists() and (run["root"] / "logs" / "report_card.log").stat().st_size > 0
    report = tmp_path / "report.html"
    result = subprocess.run([*common, "--report", str(report)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    html = report.read_text()
    for name in ("index.html", "drop_report.html", "compression.html", "samples.html", "eval.html", "bench.html",
                 "fit.html"):
        assert f"filename={name}" in html, name
