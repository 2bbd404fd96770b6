"""The rules' wiring: every job's command carries its config sections and its log (the default
DAG and every preset), a stage name as target runs that stage for every configured size, and a
user's config file reaches SFT and GRPO end to end, with every job's log written."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline.artifacts import read_manifest

PRESETS = sorted((ROOT / "workflow" / "configs").glob("*.yaml"))

# Snakemake's API, in a child process: the jobs a dry run plans, each with its rule, params, log
# and the shell command as it would run (Job.params and Job.shellcmd of the planned DAG)
PLAN = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.enums import Quietness
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

configfiles, targets = json.loads(sys.argv[1]), json.loads(sys.argv[2])
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=Path("Snakefile"),
                            config_settings=ConfigSettings(configfiles=[Path(f) for f in configfiles]))
    dag = workflow.dag(DAGSettings(targets=targets))
    dag.execute_workflow(executor="dryrun")
    print(json.dumps([{"rule": job.rule.name, "input": list(job.input), "output": list(job.output),
                       "params": dict(job.params.items()),
                       "log": list(job.log), "shell": job.shellcmd} for job in dag.workflow_api._workflow.dag.jobs]))
"""


def planned_jobs(configfiles: list[Path], targets: list[str] = ()) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", PLAN, json.dumps([str(f) for f in configfiles]),
                             json.dumps(list(targets))], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# inputs given as URLs plan the fetch rules too (a dry run downloads nothing)
URLS = {"inputs": {"wet": ["https://data.commoncrawl.org/crawl-data/x/CC-MAIN-1.warc.wet.gz"],
                   "warc": ["https://data.commoncrawl.org/crawl-data/x/CC-MAIN-1.warc.gz"]},
        "url_filter": {"lists": [{"name": "demo", "path": "https://example.org/blocklist.txt"}]}}


@pytest.mark.parametrize("preset", [None, *PRESETS, "urls"], ids=lambda p: getattr(p, "name", p or "default"))
def test_every_command_carries_its_params_and_its_log(preset, tmp_path):
    """Each param a rule declares (its config sections first of all) reaches its command, and so
    does its log: no stage runs on schema defaults while Snakemake reruns it for a changed value.
    The default DAG, every preset in workflow/configs/, and inputs given as URLs."""
    local = {"results": str(tmp_path)}
    if preset and "cluster" in str(preset):  # its inputs live on a cluster filesystem: the sample stands in
        local["inputs"] = {"wet": ["resources/commoncrawl/*.warc.wet.gz"]}
    configs = [preset] if isinstance(preset, Path) else [write_config(tmp_path / "urls.yaml", URLS)] if preset else []
    jobs = planned_jobs([*configs, write_config(tmp_path / "local.yaml", local)])
    commands = [job for job in jobs if job["shell"]]
    rules = {job["rule"] for job in commands}
    assert {"sft_size", "grpo_size", "eval_size", "pretrain_size", "pii"} <= rules
    assert preset != "urls" or {"fetch_wet", "fetch_warc", "fetch_url_list", "url_filter", "extract"} <= rules
    for job in commands:
        command = job["shell"]
        assert len(job["log"]) == 1 and f"--log {shlex.quote(job['log'][0])}" in command, (job["rule"], command)
        for name, value in job["params"].items():
            text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            assert shlex.quote(text) in command or text in command, (job["rule"], name, command[:300])
    sft = next(job for job in commands if job["rule"] == "sft_size")
    assert "--config" in sft["shell"] and "--tasks-config" in sft["shell"]


def test_a_job_reading_a_model_or_tokenizer_depends_on_the_manifest_it_is_checked_against(tmp_path):
    """A lost manifest reruns the job that writes it, so a stage never finds its input unchecked."""
    jobs = planned_jobs([write_config(tmp_path / "local.yaml", {"results": str(tmp_path)})])
    readers = set()
    for job in jobs:
        for path in map(Path, job["input"]):
            if path.name in ("final.pt", "tokenizer.json"):
                readers.add(job["rule"])
                assert str(path.with_name("manifest.json")) in job["input"], (job["rule"], path)
    assert {"eval_size", "export_hf_model", "inference_bench_size", "sft_size", "grpo_size"} <= readers


def test_sft_depends_on_the_token_shards_it_replays_and_their_manifest(tmp_path):
    """SFT replays the pretraining text: the tokens manifest and every shard are its inputs (a changed
    shard reruns it), and its command names the folder."""
    jobs = planned_jobs([write_config(tmp_path / "local.yaml", {"results": str(tmp_path)})])
    tokenize = [Path(path) for job in jobs if job["rule"] == "tokenize" for path in job["output"]
                if path.endswith((".bin", ".idx"))]
    assert len(tokenize) == 4 * sum(job["rule"] == "tokenize" for job in jobs) > 0  # train and val, .bin and .idx
    sft = next(job for job in jobs if job["rule"] == "sft_size")
    tokens = tokenize[0].parent.parent
    assert {str(tokens / "manifest.json"), *map(str, tokenize)} <= set(sft["input"])
    assert f"--tokens {tokens}" in sft["shell"]


@pytest.mark.parametrize("target, rule", [("pretrain", "pretrain_size"), ("sft", "sft_size"), ("grpo", "grpo_size"),
                                          ("eval", "eval_size"), ("export_hf", "export_hf_model"),
                                          ("inference_bench", "inference_bench_size")])
def test_a_stage_name_as_target_runs_it_for_every_configured_size(target, rule, tmp_path):
    config = write_config(tmp_path / "two.yaml", {"results": str(tmp_path), "pretrain": {"sizes": ["nano", "tiny"]},
                                                  "inference": {"sizes": ["nano", "tiny"]}})
    jobs = [job for job in planned_jobs([config], [target]) if job["rule"] == rule]
    sizes = sorted({Path(job["log"][0]).stem for job in jobs})
    assert sizes == ["nano", "tiny"], (target, [job["log"] for job in jobs])
    if target == "export_hf":  # every trained model of each size
        assert sorted(Path(job["log"][0]).parent.name for job in jobs) == ["grpo"] * 2 + ["pretrain"] * 2 + ["sft"] * 2


# a user's config file changing one key of sft, grpo and tasks each, with the rest CPU-small
POST_TRAINING = {
    "inputs": {"text": []},
    "dedup": {"bands": 2, "rows": 4},
    "tokenizer": {"vocab_size": 512},
    "pretrain": {"sizes": ["nano"], "max_steps": 4, "seq_len": 64, "micro_batch": 8, "global_batch_tokens": 512,
                 "eval_every": 4, "eval_tokens": 512, "samples": 0},
    "sft": {"max_steps": 3, "global_batch": 8, "micro_batch": 8, "eval_every": 3, "eval_examples": 8,
            "accuracy_examples": 4, "samples": 0},
    "grpo": {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "micro_batch": 4, "eval_every": 2,
             "eval_examples": 4, "accuracy_examples": 4, "samples": 0},
    "tasks": {"arithmetic": {"train_problems": 200, "test_problems": 20}},
    "eval": {"val_tokens": 2048, "mmlu": {"max_questions": 8},
             "tasks": {"max_examples": 2, "samples": 2, "k": 2}},
}


@pytest.mark.slow
def test_a_config_file_reaches_sft_and_grpo_and_every_job_logs(tmp_path, monkeypatch):
    """The data stages, SFT, GRPO, eval and the exports on the sample, small: the changed keys
    reach SFT and GRPO, and every job's log has something in it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = write_config(tmp_path / "mine.yaml", {"results": str(tmp_path), "run": "mine", **POST_TRAINING})
    targets = ["data", "sft", "grpo", "eval", "export_hf"]
    logs = [job["log"][0] for job in planned_jobs([config], targets) if job["shell"]]
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *targets, "--configfile", str(config)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "mine"
    for stage, steps in (("sft", 3), ("grpo", 2)):
        manifest = read_manifest(run / stage / "nano" / "manifest.json")
        assert manifest["config"][stage]["max_steps"] == steps and manifest["counts"]["steps"] == steps
        assert manifest["config"]["tasks"]["arithmetic"]["train_problems"] == 200
        trained = [json.loads(line)["step"] for line in (run / stage / "nano" / "metrics.jsonl").open()]
        assert max(trained) == steps
    assert read_manifest(run / "sft" / "nano" / "manifest.json")["counts"]["train_conversations"] == {"arithmetic": 200}
    assert read_manifest(run / "grpo" / "nano" / "manifest.json")["counts"]["train_prompts"] == 200
    assert len(logs) >= 25 and all(Path(log).stat().st_size > 0 for log in logs), \
        [log for log in logs if not Path(log).stat().st_size]


def test_relative_paths_in_a_config_file_are_taken_from_the_workflow_folder(tmp_path, sample_wet):
    """A config file anywhere names inputs relative to the workflow folder (results: relative to the
    folder Snakemake runs in); a file beside the config file alone is not found, and the error says
    where relative paths are taken from."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "crawl").mkdir(parents=True)
    (elsewhere / "crawl" / "mine.warc.wet.gz").write_bytes(sample_wet.read_bytes())

    def dry_run(config: dict) -> subprocess.CompletedProcess:
        mine = write_config(elsewhere / "mine.yaml", config)
        return subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "-s", str(ROOT / "Snakefile"), "data",
                               "--configfile", str(mine)], cwd=elsewhere, capture_output=True, text=True)

    result = dry_run({"inputs": {"wet": ["resources/commoncrawl/*.warc.wet.gz"]}})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"input: {ROOT / 'resources' / 'commoncrawl' / sample_wet.name}" in result.stdout
    assert f"output: results/sample/data/ingest/{sample_wet.name.removesuffix('.warc.wet.gz')}.parquet" in result.stdout
    result = dry_run({"inputs": {"wet": ["crawl/*.warc.wet.gz"]}})
    assert result.returncode != 0
    assert (f"config key 'inputs.wet': 'crawl/*.warc.wet.gz' matches no file (a relative path is taken from the "
            f"workflow folder, {ROOT})") in result.stdout + result.stderr
