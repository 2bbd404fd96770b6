# Post-training: SFT of every pretrained size (config pretrain.sizes; rule sft_size, one job per
# size), each a torchrun launch of `python -m pipeline sft` with sft.nproc processes; `snakemake sft`
# runs every size. SFT replays the pretraining text (sft.mixture.replay), so it reads the token
# shards pretraining read, checked against the tokens manifest: both are its inputs. Like
# pretraining, checkpoints and the metrics history under {RUN}/sft/{size}/checkpoints/ are not
# declared outputs, so a rerun after a failed, preempted or killed job resumes from them.
#
# On SLURM: set sft.device: cuda and sft.nproc: <GPUs per node> so the job asks for the GPUs.

SFT = config["sft"]


rule sft_size:
    input:
        model=rules.pretrain_size.output.model,
        upstream=rules.pretrain_size.output.manifest,  # what final.pt is checked against
        tokenizer=rules.tokenizer.output.tokenizer,
        tokenizer_manifest=rules.tokenizer.output.manifest,
        tokens=rules.tokens.output[0],  # the tokens manifest: replay's shards are checked against it
        shards=expand([rules.tokenize.output.train, rules.tokenize.output.train_index, rules.tokenize.output.val,
                       rules.tokenize.output.val_index], source=SOURCES),
    output:
        model=f"{RUN}/sft/{{size}}/final.pt",
        metrics=f"{RUN}/sft/{{size}}/metrics.jsonl",
        loss=report(f"{RUN}/sft/{{size}}/loss.png", caption="../workflow/report/sft_loss.rst",
                    category="SFT", subcategory="{size}"),
        samples=f"{RUN}/sft/{{size}}/samples.md",
        manifest=f"{RUN}/sft/{{size}}/manifest.json",
    log:
        f"{LOGS}/sft/{{size}}.log",
    benchmark:
        f"{BENCH}/sft/{{size}}.tsv"
    wildcard_constraints:
        size="[A-Za-z0-9.-]+",
    threads: 8 * SFT["nproc"]  # clamped to --cores on a workstation; a few cores per GPU on a cluster
    resources:
        nproc=SFT["nproc"],
        gpu=SFT["nproc"] if SFT["device"] == "cuda" else 0,
        mem_mb=8000 * SFT["nproc"],
    params:
        config=section("sft"),
        tasks=section("tasks"),
        tokens=TOKENS,
        out=lambda wc: f"{RUN}/sft/{wc.size}",
    shell:
        stage("sft", "--model {input.model:q} --tokenizer {input.tokenizer:q} --tokens {params.tokens:q}"
                     " --out {params.out:q}", sections=("config", "tasks"), launcher=torchrun(1, SFT["nproc"]))


rule sft:
    input:
        expand(rules.sft_size.output.manifest, size=config["pretrain"]["sizes"]),


# GRPO of every SFT model (rule grpo_size; `snakemake grpo`: every size): one process of
# `python -m pipeline grpo` (GRPO runs in one process; see pipeline/train/grpo.py);
# checkpoints resume like SFT's. On SLURM: set grpo.device: cuda.

GRPO = config["grpo"]


rule grpo_size:
    input:
        model=rules.sft_size.output.model,
        upstream=rules.sft_size.output.manifest,  # what final.pt is checked against
        tokenizer=rules.tokenizer.output.tokenizer,
        tokenizer_manifest=rules.tokenizer.output.manifest,
    output:
        model=f"{RUN}/grpo/{{size}}/final.pt",
        metrics=f"{RUN}/grpo/{{size}}/metrics.jsonl",
        loss=f"{RUN}/grpo/{{size}}/loss.png",
        rewards=report(f"{RUN}/grpo/{{size}}/rewards.png", caption="../workflow/report/grpo_rewards.rst",
                       category="GRPO", subcategory="{size}"),
        samples=f"{RUN}/grpo/{{size}}/samples.md",
        manifest=f"{RUN}/grpo/{{size}}/manifest.json",
    log:
        f"{LOGS}/grpo/{{size}}.log",
    benchmark:
        f"{BENCH}/grpo/{{size}}.tsv"
    wildcard_constraints:
        size="[A-Za-z0-9.-]+",
    threads: 8  # clamped to --cores on a workstation
    resources:
        gpu=1 if GRPO["device"] == "cuda" else 0,
        mem_mb=8000,
    params:
        config=section("grpo"),
        tasks=section("tasks"),
        out=lambda wc: f"{RUN}/grpo/{wc.size}",
    shell:
        stage("grpo", "--model {input.model:q} --tokenizer {input.tokenizer:q} --out {params.out:q}",
              sections=("config", "tasks"))


rule grpo:
    input:
        expand(rules.grpo_size.output.manifest, size=config["pretrain"]["sizes"]),
