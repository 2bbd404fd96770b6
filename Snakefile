# wetstone: CommonCrawl WET files -> a trained, post-trained, evaluated and served GPT.
#
#   snakemake --cores all                      the whole DAG on the bundled sample
#   snakemake --cores all data                 only the web-data stages (ends at the drop report)
#   snakemake --cores all sft                  one stage (and what it needs) for every configured size:
#                                              pretrain, sft, grpo, eval, export_hf, inference_bench
#   snakemake --cores all scaling_fit          the scaling sweep and its fit
#   snakemake --cores all report_card          the run on one page: results/<run>/report/index.html
#   snakemake --cores all --forcerun quality   rerun one stage (and what depends on it); a per-size
#                                              stage by its job's rule: --forcerun pretrain_size
#   snakemake --configfile my.yaml --cores all your own WET files / settings
#
# Rules are wiring only: each runs `python -m pipeline <stage>` (which also runs by hand) through
# `stage` below, which passes the rule's config sections and its log.
import json
import os
import sys

from pipeline.config import input_shards, validate_config, warc_batches, wet_batches
from pipeline.train.launch import torchrun_command


configfile: "config.yaml"


conda: "envs/wetstone.yaml"  # used with --software-deployment-method conda


validate_config(config)  # fills defaults; a bad key or value stops here, naming the key

RUN = f"{config['results']}/{config['run']}"
DATA = f"{RUN}/data"
LOGS = f"{RUN}/logs"
BENCH = f"{RUN}/benchmarks"
PY = sys.executable  # the interpreter running Snakemake, so rules use the same environment
WET, WARC = input_shards(config["inputs"], base=workflow.basedir)  # {file's shard name: path or URL} each
WARC_BATCHES = warc_batches(WARC, config["inputs"]["warc_batch_size"])  # {shard: [WARC file names]}
WET_BATCHES = wet_batches(WET, config["inputs"]["batch_size"], taken=WARC_BATCHES)  # {shard: [WET file names]}
SHARDS = {**WET_BATCHES, **WARC_BATCHES}  # every web shard (a batch of WET or of WARC files): both meet at langid


def section(name):
    """A stage's config slice as JSON, for `params:` (a changed value reruns the stage)."""
    return json.dumps(config[name], sort_keys=True)


# the config-slice params a rule may declare, and the flag each is passed with
SECTION_FLAGS = {"config": "--config", "tasks": "--tasks-config"}


def stage(command, args="", sections=("config",), launcher="{PY} -m pipeline"):
    """A rule's shell command: `<launcher> <command> <args>`, then each config slice the rule
    declares in params (`sections`, each with its SECTION_FLAGS flag), then `--log {log:q}`.
    Every rule builds its command here, so none leaves out its config or its log
    (tests/test_rules.py checks that each dry-run command carries every param and the log)."""
    flags = [f"{SECTION_FLAGS[name]} {{params.{name}:q}}" for name in sections]
    return " ".join(part for part in (launcher, command, args, *flags, "--log {log:q}") if part)


def torchrun(nodes, nproc):
    """The launcher of a training stage: torchrun over nodes x nproc processes. `--` ends
    torchrun's options (its argparse would take the stage's `--log` for its own `--log-dir`)."""
    return torchrun_command(PY, nodes, nproc) + " -m pipeline --"


wildcard_constraints:
    shard="[A-Za-z0-9._-]+",


include: "rules/data.smk"
include: "rules/tokenizer.smk"
include: "rules/pretrain.smk"
include: "rules/posttrain.smk"
include: "rules/scaling.smk"
include: "rules/inference.smk"
include: "rules/eval.smk"  # after the training rules: it evaluates the model of every one included before it
include: "rules/report.smk"  # last: the report card reads every stage's outputs


rule all:
    default_target: True
    input:
        rules.data.input,
        rules.tokenizer.output,
        rules.tokens.output,
        rules.pretrain.input,
        rules.sft.input,
        rules.grpo.input,
        rules.eval.input,
        rules.export_hf.input,
        rules.inference_bench.input,
        rules.scaling_fit.output.manifest,
        rules.report_card.output.manifest,
