"""The DAG through a real SLURM scheduler (`make test-cluster`, after
workflow/cluster/start_cluster.sh): the bundled sample up to `tokens` plus a 2-process pretrain,
run with `--workflow-profile workflow/profiles/slurm`, against a local run of the same config:

- every job Snakemake ran was a SLURM job, and `sacct` lists each COMPLETED under its rule;
- the pretrain job ran torchrun's 2 processes inside the executor's `srun` step;
- clean parquet, tokenizer and token shards are byte-identical to the local run's (the sha256 in
  their manifests, after `verify` re-hashed both trees).

Marked `cluster`: `make test` leaves them out (pyproject's -m 'not cluster'); `make test-cluster`
selects them with `-m cluster`, and they skip unless a SLURM cluster answers with an idle node.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.artifacts import read_manifest, verify
from pipeline.train.launch import FIRST_NODE

PRESET = ROOT / "tests" / "cluster" / "config.yaml"
RUN = "sample"
# the profile's placeholders filled for the cluster start_cluster.sh makes (account `wetstone`,
# partition `local`), its memory asks cut to a small machine, threads to its 2 CPUs; the first
# status check 5 s after a submission, then 15 s later (the plugin waits 10 s longer after each check
# that saw nothing finish): most sample jobs take 5-20 s here; the default 40 s suits real clusters
LOCAL_CLUSTER = ["--default-resources", "slurm_account=wetstone", "slurm_partition=local", "runtime=30", "mem_mb=1000",
                 "--set-resources", "dedup:mem_mb=2000", "tokenizer:mem_mb=2000", "pretrain_size:mem_mb=2000",
                 "--max-threads", "2", "--slurm-init-seconds-before-status-checks", "5"]


def cluster_up() -> str | None:
    """None when a SLURM node is idle, else why the cluster counts as down."""
    if not shutil.which("sinfo"):
        return "sinfo is not installed"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout.split()
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 10 s"
    return None if {"idle", "mixed"} & set(states) else f"no idle SLURM node (sinfo: {states or 'nothing'})"


DOWN = cluster_up()
pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(DOWN is not None, reason=f"no SLURM cluster: {DOWN}; start one with "
                                 "workflow/cluster/start_cluster.sh (as root), or run `make test-cluster`")]


def snakemake(results: Path, targets: list[str], flags: list[str]) -> list[str]:
    # targets before --configfile, which takes several values in Snakemake 9
    return [sys.executable, "-m", "snakemake", *targets, *flags, "--config", f"results={results}", f"run={RUN}",
            "--configfile", str(PRESET)]


def sacct(*args: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "--parsable2", "--noheader", *args], capture_output=True, text=True, check=True)
    return [line.split("|") for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The SLURM run and, while its jobs wait in the queue, the local run (saves a minute of CI)."""
    root = tmp_path_factory.mktemp("cluster")
    pretrain = str(root / "slurm" / RUN / "pretrain" / "nano" / "manifest.json")
    started = time.monotonic()
    slurm = subprocess.Popen(snakemake(root / "slurm", ["tokens", pretrain],
                                       ["--workflow-profile", "workflow/profiles/slurm", *LOCAL_CLUSTER]),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    local = subprocess.run(snakemake(root / "local", ["tokens"], ["--cores", "2"]), cwd=ROOT,
                           capture_output=True, text=True)
    log = slurm.communicate()[0]
    print(f"SLURM run: {time.monotonic() - started:.0f} s")
    assert local.returncode == 0, local.stderr[-3000:]
    assert slurm.returncode == 0, log[-5000:]
    return root / "local" / RUN, root / "slurm" / RUN, log


def submitted_jobs(log: str) -> dict[str, tuple[str, list[str], str]]:
    """{Snakemake job or group id: (SLURM job name, its rules, SLURM job id or '' if it ran locally)}
    from the Snakemake log. A plain job is named after its rule; a group job (rules/data.smk's
    `signatures` and `clean`) after the group, and holds several rules."""
    jobs, group, rules = {}, None, []
    for line in log.splitlines():
        if m := re.search(r"Group job (\w+) ", line):
            group, rules = m[1], []
        elif m := re.match(r"\s*(local)?rule (\w+):$", line):
            rules = [*rules, ("local " if m[1] else "") + m[2]] if group else [("local " if m[1] else "") + m[2]]
        elif (m := re.match(r"\s+jobid: (\d+)$", line)) and rules and not group:
            jobs[m[1]] = (rules[0], rules, "")
        elif m := re.match(r"Job (\S+) has been submitted with SLURM jobid (\d+)", line):
            name, rules_of_job = (group, rules) if group else jobs[m[1]][:2]
            jobs[m[1]] = (name, rules_of_job, m[2])
            group = None
    return jobs


def test_every_job_went_through_slurm(runs):
    _, _, log = runs
    jobs = submitted_jobs(log)
    rules = sorted(rule for _, job_rules, _ in jobs.values() for rule in job_rules)
    assert {"ingest", "langid", "quality", "dedup_signatures", "dedup_band", "dedup", "pii", "tokenizer",
            "tokenize", "tokens", "pretrain_size"} <= set(rules), rules
    assert all(slurm_id for _, _, slurm_id in jobs.values()), f"jobs run outside SLURM: {jobs}"
    ids = ",".join(slurm_id for _, _, slurm_id in jobs.values())
    accounted = {job_id: (state, comment) for job_id, state, comment in
                 sacct("-X", "--jobs", ids, "--format", "JobIDRaw,State,Comment%300")}
    for name, job_rules, slurm_id in jobs.values():
        state, comment = accounted[slurm_id]
        assert state == "COMPLETED", f"SLURM job {slurm_id} ({name}: {job_rules}): {state}"
        # the executor's --comment: rule_<rule>[_wildcards_...], or rule_<group>_<its rules, sorted>
        expected = rf"rule_{name}(_wildcards_|$)" if job_rules == [name] else rf"rule_{name}_{'_'.join(sorted(job_rules))}$"
        assert re.match(expected, comment), (slurm_id, name, job_rules, comment)


def test_pretrain_ran_two_processes_under_srun(runs):
    _, slurm_run, log = runs
    (slurm_id,) = [job for name, _, job in submitted_jobs(log).values() if name == "pretrain_size"]
    steps = {job_id: (state, int(cpus)) for job_id, state, cpus in
             sacct("--jobs", slurm_id, "--format", "JobIDRaw,State,AllocCPUS")}
    # .batch is the job script; .0 the executor's `srun` step, which ran torchrun and its 2 workers
    assert steps[f"{slurm_id}.0"] == ("COMPLETED", 2), steps
    manifest = read_manifest(slurm_run / "pretrain" / "nano" / "manifest.json")
    assert manifest["counts"]["world_size"] == 2, manifest["counts"]
    steps = [json.loads(line) for line in (slurm_run / "pretrain" / "nano" / "metrics.jsonl").open()]
    losses = [step["loss"] for step in steps if "loss" in step]
    assert len(losses) == manifest["counts"]["steps"] == 10 and losses[-1] < losses[0], losses


def outputs(manifest: Path) -> dict[str, str]:
    return {entry["path"]: entry["sha256"] for entry in read_manifest(manifest)["outputs"]}


def test_data_tokenizer_and_tokens_identical_to_local(runs):
    local, slurm_run, _ = runs
    for run in (local, slurm_run):
        checked, problems = verify(run)
        assert checked and not problems, problems
    manifests = sorted(p.relative_to(local) for pattern in ("data/clean/*manifest.json", "tokenizer/manifest.json",
                                                            "tokens/*manifest.json")
                       for p in local.glob(pattern))
    assert {m.parts[0] for m in manifests} == {"data", "tokenizer", "tokens"}, manifests
    for manifest in manifests:
        expected = outputs(local / manifest)
        assert expected, manifest
        assert outputs(slurm_run / manifest) == expected, manifest


def test_first_node_expression_inside_a_job():
    """pipeline/train/launch.py's rendezvous host, evaluated in a real allocation as a multi-node
    pretrain job's shell does (the job-step executor strips SLURM_* but SLURM_JOB_ID)."""
    node = subprocess.run(["sinfo", "-h", "-o", "%n"], capture_output=True, text=True, check=True).stdout.split()[0]
    result = subprocess.run(["srun", "--account=wetstone", "--nodes=1", "--ntasks=1", "env", "-u", "SLURM_JOB_NODELIST",
                             "-u", "SLURM_NODELIST", "bash", "-c", f"echo {FIRST_NODE}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == node
