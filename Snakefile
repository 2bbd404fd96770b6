# wetstone: CommonCrawl WET files -> a trained, post-trained, evaluated and served GPT.
#
#   snakemake --cores all                      the whole DAG on the bundled sample
#   snakemake --cores all data                 only the web-data stages (ends at the drop report)
#   snakemake --cores all scaling_fit          the scaling sweep and its fit
#   snakemake --cores all --forcerun quality   rerun one stage (and what depends on it)
#   snakemake --configfile my.yaml --cores all your own WET files / settings
#
# Rules are wiring only: each calls `python -m pipeline <stage>`, which also runs by hand.
import json
import os
import sys

from pipeline.config import input_shards, validate_config, warc_batches, wet_batches


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


wildcard_constraints:
    shard="[A-Za-z0-9._-]+",


include: "rules/data.smk"
include: "rules/tokenizer.smk"
include: "rules/pretrain.smk"
include: "rules/posttrain.smk"
include: "rules/scaling.smk"
include: "rules/inference.smk"
include: "rules/eval.smk"  # last: it evaluates the models of every training rule included before it


rule all:
    default_target: True
    input:
        rules.data.input,
        rules.tokenizer.output,
        rules.tokens.output,
        expand(rules.pretrain.output.manifest, size=config["pretrain"]["sizes"]),
        expand(rules.sft.output.manifest, size=config["pretrain"]["sizes"]),
        expand(rules.grpo.output.manifest, size=config["pretrain"]["sizes"]),
        expand(rules.eval.output.manifest, size=config["pretrain"]["sizes"]),
        expand(rules.export_hf.output.manifest, stage=MODEL_STAGES, size=config["pretrain"]["sizes"]),
        expand(rules.inference_bench.output.manifest, size=config["inference"]["sizes"]),
        rules.scaling_fit.output.manifest,
