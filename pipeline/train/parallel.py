"""Compute setup: process group, device and dtype, the peak FLOP/s behind MFU, and `parallelize`.

`parallel: none` runs one process. `ddp` and `fsdp` run under torchrun (`python -m
torch.distributed.run --nproc_per_node=N -m pipeline -- pretrain ...`), which sets RANK, LOCAL_RANK
and WORLD_SIZE; the process group uses nccl on GPUs and gloo on CPUs.

Mixed precision follows torchtitan: with FSDP the wrapper's MixedPrecisionPolicy casts parameters
to bf16 for compute and reduces gradients in fp32; without FSDP, `torch.autocast` does the casting.
The fp32 master weights and optimizer state are the same in both.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.config import ConfigError

# Dense bf16 tensor-core peak FLOP/s by device name (vendor datasheets; the sparse figures are
# twice these). Checked in order, so the more specific names come first.
GPU_PEAK_BF16: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (H100 80GB HBM3)
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
]


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(parallel: str, device: str, section: str) -> Dist:
    """Pick the device and, for ddp/fsdp, join the process group torchrun set up. `section` is
    the config section (`pretrain`, `sft`, ...) that errors name the keys of."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if parallel == "none" and world_size > 1:
        raise ConfigError(f"config key '{section}.parallel' is none but torchrun started {world_size} "
                          f"processes: set ddp or fsdp, or nproc 1")
    if parallel != "none" and "RANK" not in os.environ:
        raise ConfigError(f"config key '{section}.parallel' is {parallel}: launch under torchrun "
                          f"(python -m torch.distributed.run --nproc_per_node=N -m pipeline -- {section} ...)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"config key '{section}.device' is cuda but no CUDA device is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if parallel != "none":
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, local_rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, fp32 otherwise (CPU bf16 matmuls are slower than fp32 on
    most CPUs, and fp32 keeps the CPU tests bit-exact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def autocast(device: torch.device, dtype: torch.dtype, parallel: str):
    """The forward's autocast context: none for fp32, and none under FSDP, whose mixed-precision
    policy already casts the parameters."""
    if dtype == torch.float32 or parallel == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def parallelize(model: nn.Module, *, mode: str, dist_info: Dist, compile: bool,
                param_dtype: torch.dtype, activation_checkpointing: bool = False) -> nn.Module:
    """Wrap the model for `mode` in one fixed order (torchtitan's `parallelize_llama`):

    0. activation checkpointing per block (`Block.forward`), inside the compiled region and inside
       the FSDP unit (torchtitan's order): compile traces the recompute, FSDP's hooks stay outside;
    1. compile each block on its own (`Module.compile`, in place, so parameter names and
       checkpoints are unchanged); the blocks are alike, so one graph serves all of them and
       compile time does not grow with depth;
    2. ddp: DistributedDataParallel around the whole model (gradients all-reduced in buckets
       while backward runs);
       fsdp: `fully_shard` each block, then the root, which keeps the embedding, the tied output
       head and the final LayerNorm together (a tied weight must live in one FSDP group). Each
       block's parameters are all-gathered just before it runs and freed after, so a rank holds
       1/world of the parameters, gradients and optimizer state at rest.
    """
    for block in model.blocks:
        block.activation_checkpointing = activation_checkpointing
    if compile:
        for block in model.blocks:
            block.compile()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def set_grad_sync(model: nn.Module, mode: str, sync: bool):
    """Context for one micro step's backward: gradient all-reduce / reduce-scatter only on the
    last micro step of an accumulation, not on every one."""
    if mode == "ddp" and not sync:
        return model.no_sync()
    if mode == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(value: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left as it was)."""
    if dist_info.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    """Mean over ranks (gloo has no AVG, so SUM then divide)."""
    return all_reduce_sum(value, dist_info) / dist_info.world_size


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds for a tensor: its shard for an FSDP DTensor, the whole otherwise."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes held by this rank right now."""
    params = list(model.parameters())
    return {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor)),
    }


@functools.cache
def measured_cpu_flops(n: int = 1024, repeats: int = 10) -> float:
    """This CPU's fp32 matmul FLOP/s, measured: there is no datasheet peak for an arbitrary
    (often shared, virtualised) CPU, so CPU MFU is against the best GEMM rate torch gets here.
    The fastest of several matmuls, so a moment of contention from other processes does not
    lower the peak (and inflate MFU); CPU MFU is indicative only."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up the kernels and thread pool
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n ** 3 / fastest


def peak_flops(device: torch.device, configured: float | None, section: str) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where the figure comes from); None when unknown."""
    if configured:
        return configured, f"config {section}.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16:
            if key in name:
                return flops, f"{name}: datasheet dense bf16"
        return None, f"{name}: unknown peak (set {section}.peak_flops)"
    return measured_cpu_flops(), "measured fp32 matmul on this CPU"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
