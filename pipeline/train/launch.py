"""How a training rule starts its processes: the torchrun command line and the job's resources.

One node (a workstation, or one SLURM node): `torchrun --standalone --nproc_per_node=P`, a private
rendezvous on localhost. Under `--executor slurm` the job-step executor already runs every job's
command inside `srun -n1` on the allocated node.

N nodes (SLURM only): the job asks for N nodes with one task each, and the command starts one
torchrun per node with `srun`; the N torchruns meet at a c10d rendezvous on the allocation's first
node and start P processes each (world size N x P):

    srun --nodes=N --ntasks=N --ntasks-per-node=1 python -m torch.distributed.run --nnodes=N
        --nproc_per_node=P --rdzv-backend c10d --rdzv-endpoint <first node>:29500
        --rdzv-id $SLURM_JOB_ID

The job is marked `mpi` so the job-step executor runs the command as the batch script (not inside
its own one-task `srun`, which would hold the node's CPUs and starve the inner `srun`).
"""

from __future__ import annotations

# the allocation's first host name, found inside the job. The job-step executor strips SLURM_*
# variables but SLURM_JOB_ID from the job's environment, so the node list is asked of squeue
FIRST_NODE = '$(scontrol show hostnames "$(squeue --noheader --jobs "$SLURM_JOB_ID" --format %N)" | head -n 1)'
RDZV_PORT = 29500  # torchrun's default master port, free on a node that runs one training job


def torchrun_command(python: str, nodes: int, nproc: int, port: int = RDZV_PORT) -> str:
    """The shell words that start `nodes` x `nproc` training processes; append `-m pipeline -- <stage> ...`."""
    if nodes < 1 or nproc < 1:
        raise ValueError(f"nodes and nproc must be at least 1, got nodes={nodes} nproc={nproc}")
    if nodes == 1:
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node={nproc}"
    return (f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1"
            f" {python} -m torch.distributed.run --nnodes={nodes} --nproc_per_node={nproc}"
            f" --rdzv-backend c10d --rdzv-endpoint {FIRST_NODE}:{port} --rdzv-id $SLURM_JOB_ID")


def launch_resources(nodes: int, nproc: int, device: str) -> dict[str, int | str]:
    """The rule's resources that shape the SLURM job (snakemake-executor-plugin-slurm's names):
    one node: `gpu` GPUs (sbatch --gpus, 0 on CPU); N nodes: --nodes=N with N tasks, the GPUs
    asked per node (sbatch --gpus would be a total SLURM may spread unevenly)."""
    gpus = nproc if device == "cuda" else 0
    if nodes == 1:
        return {"gpu": gpus}
    per_node = {"slurm_extra": f"--gpus-per-node={gpus}"} if gpus else {}
    return {"nodes": nodes, "tasks": nodes, "mpi": "srun", **per_node}
