"""How the pretrain rule starts torchrun: one node standalone, N nodes through `srun` and a c10d
rendezvous on the first node (pipeline/train/launch.py), checked with torchrun's own parser and
through Snakemake's rendering of the rule."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import yaml
from torch.distributed.run import get_args_parser

from conftest import ROOT
from pipeline.config import ConfigError, section_config
from pipeline.train.launch import FIRST_NODE, RDZV_PORT, launch_resources, torchrun_command


def torchrun_args(words: list[str]):
    """torchrun's parsed options, as torchrun itself reads them (the program is `-m pipeline`)."""
    start = words.index("torch.distributed.run") + 1
    return get_args_parser().parse_args(words[start:] + ["-m", "pipeline", "--", "pretrain"])


def test_one_node_is_standalone():
    words = shlex.split(torchrun_command("/venv/bin/python", nodes=1, nproc=2))
    assert words[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    args = torchrun_args(words)
    assert args.standalone and args.nproc_per_node == "2" and args.nnodes == "1:1"


def test_multi_node_command():
    command = torchrun_command("/venv/bin/python", nodes=4, nproc=8)
    # the first node's name is found by the shell inside the job; stand in a name to parse the rest
    words = shlex.split(command.replace(FIRST_NODE, "gpu-017"))
    assert words[:4] == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1"]  # one torchrun per node
    assert words[4:7] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    args = torchrun_args(words)
    assert not args.standalone
    assert (args.nnodes, args.nproc_per_node) == ("4", "8")
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("c10d", f"gpu-017:{RDZV_PORT}")
    assert args.rdzv_id == "$SLURM_JOB_ID"  # left to the shell: one rendezvous per SLURM job


def test_first_node_expression_asks_slurm():
    # bash must see one command substitution that reads the job's node list and keeps its first host
    assert FIRST_NODE.startswith("$(scontrol show hostnames ") and FIRST_NODE.endswith("| head -n 1)")
    assert '--jobs "$SLURM_JOB_ID"' in FIRST_NODE
    result = subprocess.run(["bash", "-n", "-c", f"echo {FIRST_NODE}:{RDZV_PORT}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_launch_resources():
    assert launch_resources(1, 2, "cpu") == {"gpu": 0}
    assert launch_resources(1, 8, "cuda") == {"gpu": 8}
    assert launch_resources(2, 8, "cpu") == {"nodes": 2, "tasks": 2, "mpi": "srun"}
    assert launch_resources(4, 8, "cuda") == {"nodes": 4, "tasks": 4, "mpi": "srun",
                                              "slurm_extra": "--gpus-per-node=8"}
    with pytest.raises(ValueError, match="nodes=0"):
        torchrun_command("python", nodes=0, nproc=1)


def test_nodes_key_and_batch_over_all_processes():
    cfg = section_config("pretrain", {"parallel": "ddp", "nproc": 2, "nodes": 2, "micro_batch": 4,
                                      "seq_len": 64, "global_batch_tokens": 1024})
    assert cfg["nodes"] == 2 and section_config("pretrain", {})["nodes"] == 1
    with pytest.raises(ConfigError, match=r"'pretrain.global_batch_tokens' = 512 .* 4 x 64 x 4"):
        section_config("pretrain", {"parallel": "ddp", "nproc": 2, "nodes": 2, "micro_batch": 4,
                                    "seq_len": 64, "global_batch_tokens": 512})
    with pytest.raises(ConfigError, match="pretrain.nodes"):
        section_config("pretrain", {"nodes": 0})


def test_rule_renders_the_multi_node_launch(tmp_path):
    """The pretrain rule as Snakemake renders it with pretrain.nodes: 2 (a dry run prints the
    shell command and the job's resources, which the SLURM executor turns into sbatch options)."""
    preset = tmp_path / "two_nodes.yaml"
    preset.write_text(yaml.safe_dump({"pretrain": {"sizes": ["nano"], "parallel": "ddp", "nproc": 2, "nodes": 2,
                                                   "global_batch_tokens": 16384},  # 16 x 256 x 4 processes
                                      "scaling": {"pretrain": {"nproc": 1, "parallel": "none"}}}))
    target = tmp_path / "sample" / "pretrain" / "nano" / "manifest.json"
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", str(target), "--config", f"results={tmp_path}",
           "--configfile", str(preset)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    block = result.stdout[result.stdout.index("rule pretrain_size:"):]
    resources = block[block.index("resources:"):].splitlines()[0]
    assert "nodes=2" in resources and "tasks=2" in resources and "mpi=srun" in resources
    shell = next(line for line in block.splitlines() if "torch.distributed.run" in line)
    assert shell.startswith("Shell command: srun --nodes=2 --ntasks=2 --ntasks-per-node=1 ")
    assert f"--nnodes=2 --nproc_per_node=2 --rdzv-backend c10d --rdzv-endpoint {FIRST_NODE}:{RDZV_PORT}" in shell
    assert " -m pipeline -- pretrain --data " in shell
