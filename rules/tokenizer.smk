# The tokenizer half: train our BPE on clean documents + inputs.text (one job), then tokenize every
# source into train/val shards (one job per clean WET shard or text corpus, in parallel), then
# gather tokens/manifest.json, which the training stage reads (vocab_size, eos_id, dtype).
import os
import re

from pipeline.tokenizer.sources import text_sources, web_source

TOKENIZER = f"{RUN}/tokenizer"
TOKENS = f"{RUN}/tokens"
# OpenAI's GPT-2 files: the compression report's yardstick (bundled, with provenance and license)
GPT2_FILES = [os.path.join(workflow.basedir, "resources", "gpt2", name) for name in ("encoder.json", "vocab.bpe")]
# {source name: Source}: every clean web shard, then every inputs.text corpus
TEXT = text_sources(config["inputs"]["text"], base=workflow.basedir, taken=SHARDS)
SOURCES = {shard: web_source(shard, f"{DATA}/clean/{shard}.parquet") for shard in SHARDS} | TEXT


rule tokenizer:
    input:
        clean=expand(f"{DATA}/clean/{{shard}}.parquet", shard=SHARDS),
        upstream=expand(f"{DATA}/clean/{{shard}}.manifest.json", shard=SHARDS),  # what clean/ is checked against
        text=[source.path for source in TEXT.values()],
        gpt2=GPT2_FILES,
    output:
        tokenizer=f"{TOKENIZER}/tokenizer.json",
        compression=f"{TOKENIZER}/compression.json",
        report=f"{TOKENIZER}/compression.md",
        manifest=f"{TOKENIZER}/manifest.json",
    log:
        f"{LOGS}/tokenizer.log",
    benchmark:
        f"{BENCH}/tokenizer.tsv"
    resources:
        mem_mb=8000,
    params:
        config=section("tokenizer"),
        text=json.dumps([vars(source) for source in TEXT.values()], sort_keys=True),
    shell:
        stage("tokenizer", "--clean {input.clean:q} --text {params.text:q} --gpt2 {input.gpt2:q}"
                           " --tokenizer {output.tokenizer:q} --compression {output.compression:q}"
                           " --report {output.report:q} --manifest {output.manifest:q}")


rule tokenize:
    input:
        docs=lambda wc: SOURCES[wc.source].path,
        tokenizer=rules.tokenizer.output.tokenizer,
        upstream=lambda wc: [rules.tokenizer.output.manifest]
        + ([f"{DATA}/clean/{wc.source}.manifest.json"] if wc.source in SHARDS else []),
    output:
        train=f"{TOKENS}/train/{{source}}.bin",
        train_index=f"{TOKENS}/train/{{source}}.idx",
        val=f"{TOKENS}/val/{{source}}.bin",
        val_index=f"{TOKENS}/val/{{source}}.idx",
        manifest=f"{TOKENS}/{{source}}.manifest.json",
    wildcard_constraints:
        source="|".join(re.escape(name) for name in SOURCES),
    log:
        f"{LOGS}/tokenize/{{source}}.log",
    benchmark:
        f"{BENCH}/tokenize/{{source}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    params:
        config=section("tokenizer"),
        source=lambda wc: SOURCES[wc.source].to_json(),
    shell:
        stage("tokenize", "--source {params.source:q} --tokenizer {input.tokenizer:q} --train {output.train:q}"
                          " --val {output.val:q} --manifest {output.manifest:q} --threads {threads}")


rule tokens:
    input:
        manifests=expand(rules.tokenize.output.manifest, source=SOURCES),
        tokenizer=rules.tokenizer.output.tokenizer,
        upstream=rules.tokenizer.output.manifest,
    output:
        f"{TOKENS}/manifest.json",
    log:
        f"{LOGS}/tokens.log",
    benchmark:
        f"{BENCH}/tokens.tsv"
    shell:
        stage("tokens", "--tokenizer {input.tokenizer:q} --output {output:q} {input.manifests:q}", sections=())
