# Pretraining: one job (rule pretrain_size) per model size in config pretrain.sizes, each a torchrun
# launch of `python -m pipeline pretrain` with pretrain.nproc processes (GPUs per node on a cluster);
# `snakemake pretrain` trains every configured size.
# Checkpoints and the metrics history under {RUN}/pretrain/{size}/checkpoints/ are not declared
# outputs, so Snakemake leaves them when a job fails, is preempted or killed (it deletes only the
# declared outputs of an incomplete job), and the rerun resumes from them; metrics.jsonl is written
# from the history at the end. The trainer holds {RUN}/pretrain/{size}/train.lock while it runs and
# stops (with a checkpoint) on SIGTERM/SIGINT or when torchrun, its parent, dies.
#
# On SLURM (--executor slurm): `gpu` becomes --gpus=N, `threads` --cpus-per-task; set
# pretrain.device: cuda and pretrain.nproc: <GPUs per node> so the job asks for the GPUs.
# pretrain.nodes: N > 1 makes it one job over N nodes, `srun` starting a torchrun on each, meeting
# at a c10d rendezvous on the first node (pipeline/train/launch.py renders the command).
from pipeline.train.launch import launch_resources

PRETRAIN = config["pretrain"]
# the section without `sizes`, as the job's params: adding a size must not rerun the sizes trained
PRETRAIN_PARAMS = json.dumps({k: v for k, v in PRETRAIN.items() if k != "sizes"}, sort_keys=True)


rule pretrain_size:
    input:
        tokens=rules.tokens.output[0],
        tokenizer=rules.tokenizer.output.tokenizer,
        tokenizer_manifest=rules.tokenizer.output.manifest,
    output:
        model=f"{RUN}/pretrain/{{size}}/final.pt",
        metrics=f"{RUN}/pretrain/{{size}}/metrics.jsonl",
        loss=report(f"{RUN}/pretrain/{{size}}/loss.png", caption="../workflow/report/pretrain_loss.rst",
                    category="Pretrain", subcategory="{size}"),
        samples=f"{RUN}/pretrain/{{size}}/samples.md",
        manifest=f"{RUN}/pretrain/{{size}}/manifest.json",
    log:
        f"{LOGS}/pretrain/{{size}}.log",
    benchmark:
        f"{BENCH}/pretrain/{{size}}.tsv"
    wildcard_constraints:
        size="[A-Za-z0-9.-]+",
    threads: 8 * PRETRAIN["nproc"]  # clamped to --cores on a workstation; a few cores per GPU on a cluster
    resources:
        nproc=PRETRAIN["nproc"],
        mem_mb=8000 * PRETRAIN["nproc"],  # per node
        **launch_resources(PRETRAIN["nodes"], PRETRAIN["nproc"], PRETRAIN["device"]),
    params:
        config=PRETRAIN_PARAMS,
        data=f"{RUN}/tokens",
        out=lambda wc: f"{RUN}/pretrain/{wc.size}",
    shell:
        stage("pretrain", "--data {params.data:q} --out {params.out:q} --size {wildcards.size}"
                          " --tokenizer {input.tokenizer:q}", launcher=torchrun(PRETRAIN["nodes"], PRETRAIN["nproc"]))


rule pretrain:
    input:
        expand(rules.pretrain_size.output.manifest, size=PRETRAIN["sizes"]),
