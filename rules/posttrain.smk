# Post-training. GRPO of every SFT model (config pretrain.sizes): one process of
# `python -m pipeline grpo` (GRPO runs in one process; see pipeline/train/grpo_stage.py). Like
# pretraining, checkpoints and the metrics history under {RUN}/grpo/{size}/checkpoints/ are not
# declared outputs, so a rerun after a failed, preempted or killed job resumes from them.
#
# On SLURM: set grpo.device: cuda so the job asks for a GPU.

GRPO = config["grpo"]


rule grpo:
    input:
        model=f"{RUN}/sft/{{size}}/final.pt",
        upstream=f"{RUN}/sft/{{size}}/manifest.json",  # what final.pt is checked against
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
        "{PY} -m pipeline grpo --model {input.model:q} --tokenizer {input.tokenizer:q} --out {params.out:q}"
        " --config {params.config:q} --tasks-config {params.tasks:q} --log {log:q}"
