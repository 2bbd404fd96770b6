"""Pretraining throughput: tokens/s and MFU of the production loop (`pipeline.train.pretrain.train`).

It runs the real loop (data loader, accumulation, clipping, watchdog, metrics) for --steps steps on
random tokens (or on --data) and reports the median tokens/s and MFU over the steps after the
first --warmup ones (compilation, allocator warm-up), with the peak FLOP/s assumed for the device.

    CPU, the default tiny model:  python -m benchmarks.bench_pretrain --size tiny
    one GPU, GPT-2 124M shape:    python -m benchmarks.bench_pretrain --size gpt2-124m --compile
    8 GPUs, FSDP2:                python -m torch.distributed.run --standalone --nproc_per_node=8 \\
                                    -m benchmarks.bench_pretrain --size gpt2-124m --compile --parallel fsdp

On CUDA the loop runs bf16 (autocast, or FSDP's mixed-precision policy), fused AdamW, and
attention restricted to the flash kernel (`sdpa_kernel(FLASH_ATTENTION)` fails loudly if it cannot
run). MFU = flops_per_token x tokens/s / (peak x processes); the peak is the datasheet dense bf16
figure for known GPUs (H100 SXM 989 TFLOP/s) and a measured fp32 matmul rate on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import write_manifest
from pipeline.config import section_config
from pipeline.token_shards import write_shard
from pipeline.train.pretrain import train

# size -> (seq_len, micro_batch, vocab of the random tokens)
SHAPES = {
    "nano": (64, 16, 4096),
    "tiny": (256, 16, 4096),
    "small": (256, 16, 4096),
    "gpt2-124m": (1024, 16, 50257),
    "gpt2-350m": (1024, 8, 50257),
}


def random_tokens(folder: Path, vocab_size: int, n_tokens: int) -> Path:
    """A tokens folder of uniform random ids (throughput does not depend on the text)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_tokens), ("val", n_tokens)):
        docs = np.array_split(rng.integers(0, vocab_size - 1, n), max(1, n // 1000))
        write_shard(folder / split / "part-000.bin", [np.append(d, vocab_size - 1) for d in docs], vocab_size)
    write_manifest(folder / "manifest.json", stage="bench tokens", config={}, inputs=[], outputs={},
                   metrics={"vocab_size": vocab_size, "eos_id": vocab_size - 1})
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=SHAPES)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    parser.add_argument("--micro-batch", type=int, help="default: per size (SHAPES)")
    parser.add_argument("--data", type=Path, help="a tokens folder; default: random tokens")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "disabled")

    seq_len, micro_batch, vocab_size = SHAPES[args.size]
    micro_batch = args.micro_batch or micro_batch
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    global_batch = micro_batch * seq_len * world_size  # no accumulation: one micro step per update
    scratch = Path(tempfile.gettempdir()) / f"wetstone-bench-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}"
    # each rank writes its own identical copy of the random data, so no rank waits on another
    data = args.data or random_tokens(scratch / f"tokens-rank{rank}", vocab_size, (args.steps + 2) * global_batch)
    cfg = section_config("pretrain", {
        "parallel": args.parallel, "compile": args.compile, "seq_len": seq_len, "micro_batch": micro_batch,
        "global_batch_tokens": global_batch, "max_steps": args.steps, "warmup_steps": 2, "lr": 6e-4,
        "eval_every": args.steps, "eval_tokens": global_batch, "checkpoint_every": args.steps, "keep": 1,
        "log_every": 5, "samples": 0, "wandb_mode": "disabled"})
    attention = contextlib.nullcontext()
    if torch.cuda.is_available():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        attention = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    with attention:
        summary = train(cfg, data=data, out=scratch / "run", size=args.size)
    if rank == 0:
        records = [json.loads(line) for line in (scratch / "run" / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if r.get("tokens_per_s") and r["step"] > args.warmup]
        metrics = summary["metrics"]
        mfus = [r["mfu"] for r in timed if r["mfu"] is not None]
        result = {
            "size": args.size, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "processes": world_size, "parallel": args.parallel, "dtype": metrics["dtype"], "compile": args.compile,
            "seq_len": seq_len, "micro_batch": micro_batch, "params": metrics["params"],
            "flops_per_token": metrics["flops_per_token"],
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in timed])),
            "mfu": float(np.median(mfus)) if mfus else None,
            "peak_flops_per_device": metrics["peak_flops"], "peak_flops_source": metrics["peak_flops_source"],
            "peak_mem_gib": metrics["peak_mem_bytes"] / 2 ** 30, "timed_steps": len(timed),
            "state_bytes_per_rank": metrics["state_bytes_per_rank"],  # params, grads, optimizer
            "torch": torch.__version__, "command": " ".join(["python -m benchmarks.bench_pretrain", *sys.argv[1:]]),
        }
        print(json.dumps(result, indent=2))
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
        print(f"| {result['device']} | {args.size} | {world_size} x {args.parallel} | {result['dtype']} | "
              f"{'yes' if args.compile else 'no'} | {result['tokens_per_s']:,.0f} | {mfu} | "
              f"{result['peak_flops_per_device']:.3g} ({result['peak_flops_source']}) |")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
