# The web-data half: per shard (one job each, so a cluster spreads them over nodes); a WET shard is a
# batch of inputs.batch_size WET files, a WARC shard of inputs.warc_batch_size WARC files (one by default)
#   WET:  ingest ------------------\
#   WARC: url_filter -> extract ----> langid -> quality -> dedup_signatures      (group `signatures`)
# then one dedup_band job per LSH band (and one for exact text), one global dedup (clusters) job
# (union-find over the bands' pairs, writing each shard's duplicates to dedup/clusters/<shard>.parquet),
# then per shard dedup_filter -> deduped/, decontaminate ->
# decontaminated/ (on the text as crawled), pii -> clean/ (the last text change; group `clean`), and
# the report. On a cluster each group runs a shard's chain as one job (the SLURM profile's
# group-components packs several shards into one), not one job per shard per stage.
# WARC shards are named <first stem>.warc or <first stem>.x<n>.warc, so they never meet a WET shard's name.
# Every per-shard stage writes <shard>.manifest.json; `seal` merges them into the stage folder's
# manifest.json. A stage checks each input against the manifest that names it (inputs `upstream`),
# so those manifests are inputs too: a lost one reruns the job that writes it.
import os

from pipeline.data.url_filter import block_lists

# stage folder -> the shards whose jobs write into it (an entry point with no inputs has none)
FOLDER_SHARDS = {"ingest": WET_BATCHES, "url_filter": WARC_BATCHES, "extract": WARC_BATCHES, "langid": SHARDS, "quality": SHARDS,
                 "dedup/signatures": SHARDS, "deduped": SHARDS, "decontaminated": SHARDS, "clean": SHARDS}
STAGE_FOLDERS = [folder for folder, shards in FOLDER_SHARDS.items() if shards]
ENTRIES = [entry for entry, shards in (("wet", WET), ("warc", WARC)) if shards]


def batch_input(sources, batches, download):
    """The input function of a batch's files: a local file as is; a URL comes through its fetch
    rule into the run folder (`download`, formatted with the file's own shard name)."""
    return lambda wildcards: [download.format(name=name) if sources[name].startswith(("http://", "https://"))
                              else sources[name] for name in batches[wildcards.shard]]


wet_input = batch_input(WET, WET_BATCHES, f"{RUN}/fetch/{{name}}.warc.wet.gz")
warc_input = batch_input(WARC, WARC_BATCHES, f"{RUN}/fetch/warc/{{name}}.gz")


# url_filter.lists: {name: path or URL}, and the local files the job reads (fetch_url_list downloads URLs)
URL_LISTS = block_lists(config["url_filter"]["lists"], base=workflow.basedir)
URL_LIST_FILES = {name: f"{RUN}/fetch/lists/{name}.txt" if path.startswith(("http://", "https://")) else path
                  for name, path in URL_LISTS.items()}


def entry_output(wildcards, kind):
    """langid's input for a shard: ingest's output for a WET shard, extract's for a WARC shard."""
    folder = "extract" if wildcards.shard in WARC_BATCHES else "ingest"
    return f"{DATA}/{folder}/{wildcards.shard}.{kind}"


rule fetch_wet:  # one per WET file given as a URL (`shard`: that file's own name, not its batch's)
    output:
        f"{RUN}/fetch/{{shard}}.warc.wet.gz",
    log:
        f"{LOGS}/fetch_wet/{{shard}}.log",
    benchmark:
        f"{BENCH}/fetch_wet/{{shard}}.tsv"
    group: "signatures"  # a shard's chain to its signatures: one cluster job
    params:
        url=lambda wc: WET[wc.shard],
        config=section("fetch"),
    retries: 3
    shell:
        stage("fetch", "{params.url:q} {output:q}")


rule fetch_warc:  # one per WARC file given as a URL (`shard`: that file's own name)
    output:
        f"{RUN}/fetch/warc/{{shard}}.gz",
    log:
        f"{LOGS}/fetch_warc/{{shard}}.log",
    benchmark:
        f"{BENCH}/fetch_warc/{{shard}}.tsv"
    group: "signatures"
    params:
        url=lambda wc: WARC[wc.shard],
        config=section("fetch"),
    retries: 3
    shell:
        stage("fetch", "{params.url:q} {output:q}")


rule fetch_url_list:
    output:
        f"{RUN}/fetch/lists/{{name}}.txt",
    log:
        f"{LOGS}/fetch_url_list/{{name}}.log",
    benchmark:
        f"{BENCH}/fetch_url_list/{{name}}.tsv"
    params:
        url=lambda wc: URL_LISTS[wc.name],
        config=section("fetch"),
    retries: 3
    shell:
        stage("fetch", "{params.url:q} {output:q}")


rule ingest:
    input:
        wet=wet_input,
    output:
        docs=f"{DATA}/ingest/{{shard}}.parquet",
        removed=f"{DATA}/removed/ingest/{{shard}}.parquet",
        manifest=f"{DATA}/ingest/{{shard}}.manifest.json",
    log:
        f"{LOGS}/ingest/{{shard}}.log",
    benchmark:
        f"{BENCH}/ingest/{{shard}}.tsv"
    resources:
        mem_mb=4000,
    group: "signatures"
    params:
        config=section("ingest"),
    shell:
        stage("ingest", "--input {input.wet:q} --output {output.docs:q} --removed {output.removed:q}"
                        " --manifest {output.manifest:q}")


# --- WARC input (url_filter -> extract), joining the WET documents at langid
rule url_filter:
    input:
        warc=warc_input,
        lists=list(URL_LIST_FILES.values()),
    output:
        docs=f"{DATA}/url_filter/{{shard}}.parquet",
        removed=f"{DATA}/removed/url_filter/{{shard}}.parquet",
        manifest=f"{DATA}/url_filter/{{shard}}.manifest.json",
    log:
        f"{LOGS}/url_filter/{{shard}}.log",
    benchmark:
        f"{BENCH}/url_filter/{{shard}}.tsv"
    resources:
        mem_mb=8000,
    group: "signatures"
    params:
        config=section("url_filter"),
        lists=json.dumps(URL_LIST_FILES, sort_keys=True),
    shell:
        stage("url_filter", "--input {input.warc:q} --output {output.docs:q} --removed {output.removed:q}"
                            " --manifest {output.manifest:q} --lists {params.lists:q}")


rule extract:
    input:
        warc=warc_input,
        passed=rules.url_filter.output.docs,
        upstream=rules.url_filter.output.manifest,
    output:
        docs=f"{DATA}/extract/{{shard}}.parquet",
        removed=f"{DATA}/removed/extract/{{shard}}.parquet",
        manifest=f"{DATA}/extract/{{shard}}.manifest.json",
    log:
        f"{LOGS}/extract/{{shard}}.log",
    benchmark:
        f"{BENCH}/extract/{{shard}}.tsv"
    resources:
        mem_mb=8000,
    group: "signatures"
    params:
        config=section("extract"),
    shell:
        stage("extract", "--input {input.warc:q} --passed {input.passed:q} --output {output.docs:q}"
                         " --removed {output.removed:q} --manifest {output.manifest:q}")


rule langid:
    input:
        docs=lambda wc: entry_output(wc, "parquet"),
        upstream=lambda wc: entry_output(wc, "manifest.json"),
    output:
        docs=f"{DATA}/langid/{{shard}}.parquet",
        removed=f"{DATA}/removed/langid/{{shard}}.parquet",
        manifest=f"{DATA}/langid/{{shard}}.manifest.json",
    log:
        f"{LOGS}/langid/{{shard}}.log",
    benchmark:
        f"{BENCH}/langid/{{shard}}.tsv"
    resources:
        mem_mb=4000,
    group: "signatures"
    params:
        config=section("langid"),
    shell:
        stage("langid", "--input {input.docs:q} --output {output.docs:q} --removed {output.removed:q}"
                        " --manifest {output.manifest:q}")


rule quality:
    input:
        docs=rules.langid.output.docs,
        upstream=rules.langid.output.manifest,
    output:
        docs=f"{DATA}/quality/{{shard}}.parquet",
        removed=f"{DATA}/removed/quality/{{shard}}.parquet",
        manifest=f"{DATA}/quality/{{shard}}.manifest.json",
    log:
        f"{LOGS}/quality/{{shard}}.log",
    benchmark:
        f"{BENCH}/quality/{{shard}}.tsv"
    resources:
        mem_mb=4000,
    group: "signatures"
    params:
        config=section("quality"),
    shell:
        stage("quality", "--input {input.docs:q} --output {output.docs:q} --removed {output.removed:q}"
                         " --manifest {output.manifest:q}")


rule dedup_signatures:
    input:
        docs=rules.quality.output.docs,
        upstream=rules.quality.output.manifest,
    output:
        signatures=f"{DATA}/dedup/signatures/{{shard}}.parquet",
        buckets=f"{DATA}/dedup/buckets/{{shard}}.parquet",
        manifest=f"{DATA}/dedup/signatures/{{shard}}.manifest.json",
    log:
        f"{LOGS}/dedup_signatures/{{shard}}.log",
    benchmark:
        f"{BENCH}/dedup_signatures/{{shard}}.tsv"
    resources:
        mem_mb=4000,
    group: "signatures"
    params:
        config=section("dedup"),
    shell:
        stage("dedup signatures", "--input {input.docs:q} --output {output.signatures:q}"
                                  " --buckets {output.buckets:q} --manifest {output.manifest:q}")


# one job per LSH band, plus one for exact text: each reads its row groups of every shard's bucket
# index and sorts them, by key range when they outgrow dedup.memory_mb, into candidate pairs
DEDUP_BANDS = [*map(str, range(config["dedup"]["bands"])), "exact"]


rule dedup_band:
    input:
        buckets=expand(rules.dedup_signatures.output.buckets, shard=SHARDS),
        upstream=expand(rules.dedup_signatures.output.manifest, shard=SHARDS),
    output:
        pairs=f"{DATA}/dedup/pairs/{{band}}.parquet",
        manifest=f"{DATA}/dedup/pairs/{{band}}.manifest.json",
    log:
        f"{LOGS}/dedup_band/{{band}}.log",
    benchmark:
        f"{BENCH}/dedup_band/{{band}}.tsv"
    wildcard_constraints:
        band="|".join(DEDUP_BANDS),
    resources:
        mem_mb=2000,
    params:
        config=section("dedup"),
    shell:
        stage("dedup band", "--band {wildcards.band} --input {input.buckets:q} --upstream {input.upstream:q}"
                            " --output {output.pairs:q} --manifest {output.manifest:q}")


rule dedup:
    input:
        signatures=expand(rules.dedup_signatures.output.signatures, shard=SHARDS),
        pairs=expand(rules.dedup_band.output.pairs, band=DEDUP_BANDS),
        upstream=[*expand(rules.dedup_signatures.output.manifest, shard=SHARDS),
                  *expand(rules.dedup_band.output.manifest, band=DEDUP_BANDS)],
    output:
        clusters=expand(f"{DATA}/dedup/clusters/{{shard}}.parquet", shard=SHARDS),
        shard_manifests=expand(f"{DATA}/dedup/clusters/{{shard}}.manifest.json", shard=SHARDS),
        manifest=f"{DATA}/dedup/manifest.json",
    log:
        f"{LOGS}/dedup/clusters.log",
    benchmark:
        f"{BENCH}/dedup/clusters.tsv"
    resources:
        mem_mb=4000,
    params:
        config=section("dedup"),
        folder=f"{DATA}/dedup/clusters",
    shell:
        stage("dedup clusters", "--input {input.signatures:q} --pairs {input.pairs:q} --output {params.folder:q}"
                                " --manifest {output.manifest:q}")


rule dedup_filter:
    input:
        docs=rules.quality.output.docs,
        clusters=f"{DATA}/dedup/clusters/{{shard}}.parquet",  # this shard's duplicates only
        upstream=[rules.quality.output.manifest, f"{DATA}/dedup/clusters/{{shard}}.manifest.json"],
    output:
        docs=f"{DATA}/deduped/{{shard}}.parquet",
        removed=f"{DATA}/removed/dedup/{{shard}}.parquet",
        manifest=f"{DATA}/deduped/{{shard}}.manifest.json",
    log:
        f"{LOGS}/dedup_filter/{{shard}}.log",
    benchmark:
        f"{BENCH}/dedup_filter/{{shard}}.tsv"
    resources:
        mem_mb=4000,
    group: "clean"  # dedup_filter -> decontaminate -> pii of a shard: one cluster job
    params:
        config=section("dedup"),
    shell:
        stage("dedup filter", "--input {input.docs:q} --clusters {input.clusters:q} --output {output.docs:q}"
                              " --removed {output.removed:q} --manifest {output.manifest:q}")


# --- decontaminate: dedup's output -> decontaminated/, dropping documents that quote an eval set;
# before pii, so it sees the text as crawled
EVALSETS = json.dumps({"mmlu": os.path.join(workflow.basedir, config["eval"]["mmlu"]["path"]),
                       "tasks": config["eval"]["tasks"]["names"]}, sort_keys=True)


rule decontaminate:
    input:
        docs=rules.dedup_filter.output.docs,
        upstream=rules.dedup_filter.output.manifest,
        mmlu=os.path.join(workflow.basedir, config["eval"]["mmlu"]["path"]),
    output:
        docs=f"{DATA}/decontaminated/{{shard}}.parquet",
        removed=f"{DATA}/removed/decontaminate/{{shard}}.parquet",
        manifest=f"{DATA}/decontaminated/{{shard}}.manifest.json",
    log:
        f"{LOGS}/decontaminate/{{shard}}.log",
    benchmark:
        f"{BENCH}/decontaminate/{{shard}}.tsv"
    resources:
        mem_mb=4000,
    group: "clean"
    params:
        config=section("decontaminate"),
        evalsets=EVALSETS,
        tasks=section("tasks"),
    shell:
        stage("decontaminate", "--input {input.docs:q} --output {output.docs:q} --removed {output.removed:q}"
                               " --manifest {output.manifest:q} --evalsets {params.evalsets:q}",
              sections=("config", "tasks"))


# --- pii: the last text change, after decontaminate -> clean/
rule pii:
    input:
        docs=rules.decontaminate.output.docs,
        upstream=rules.decontaminate.output.manifest,
    output:
        docs=f"{DATA}/clean/{{shard}}.parquet",
        removed=f"{DATA}/removed/pii/{{shard}}.parquet",
        manifest=f"{DATA}/clean/{{shard}}.manifest.json",
    log:
        f"{LOGS}/pii/{{shard}}.log",
    benchmark:
        f"{BENCH}/pii/{{shard}}.tsv"
    resources:
        mem_mb=4000,
    group: "clean"
    params:
        config=section("pii"),
    shell:
        stage("pii", "--input {input.docs:q} --output {output.docs:q} --removed {output.removed:q}"
                     " --manifest {output.manifest:q}")


rule seal:
    input:
        lambda wc: expand(f"{DATA}/{wc.folder}/{{shard}}.manifest.json", shard=FOLDER_SHARDS[wc.folder]),
    output:
        f"{DATA}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder="|".join(STAGE_FOLDERS),  # not dedup/: the clusters job writes its own manifest
    log:
        f"{LOGS}/seal/{{folder}}.log",
    benchmark:
        f"{BENCH}/seal/{{folder}}.tsv"
    shell:
        stage("seal", "{output:q} {input:q}", sections=())


rule data_report:
    input:
        manifests=[f"{DATA}/{folder}/manifest.json" for folder in STAGE_FOLDERS],
        clusters=rules.dedup.output.manifest,
    output:
        json=f"{DATA}/drop_report.json",
        md=f"{DATA}/drop_report.md",  # in the Snakemake report as an HTML page of the report card's (rules/report.smk)
        funnel=report(f"{DATA}/plots/funnel.png", caption="../workflow/report/funnel.rst", category="Data"),
        reasons=report(f"{DATA}/plots/drop_reasons.png", caption="../workflow/report/drop_reasons.rst", category="Data"),
        languages=report(f"{DATA}/plots/languages.png", caption="../workflow/report/languages.rst", category="Data"),
        manifest=f"{DATA}/manifest.json",
    log:
        f"{LOGS}/data_report.log",
    benchmark:
        f"{BENCH}/data_report.tsv"
    params:
        data=DATA,
        entries=ENTRIES,
    shell:
        stage("data-report", "--data {params.data:q} --entries {params.entries}", sections=())


rule data:
    input:
        rules.data_report.output,
        expand(rules.pii.output.docs, shard=SHARDS),
