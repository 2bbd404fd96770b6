# Eval: per model size (rule eval_size), every model of that size the run trains, side by side (rows
# base / SFT / GRPO of the table); and export-hf of every final model (rule export_hf_model), so
# lm-evaluation-harness, vLLM and HF `generate` can load any of them. `snakemake eval` and
# `snakemake export_hf` run every configured size. Included after the training rules: a post-training
# stage whose rule exists (rules.sft, rules.grpo) adds its model to the table and to the exports by itself.
import os
import shlex

EVAL_MMLU = os.path.join(workflow.basedir, config["eval"]["mmlu"]["path"])
# the training stages in order, and those this run has rules for
MODEL_STAGES = [stage for stage in ("pretrain", "sft", "grpo") if stage in {rule.name for rule in workflow.rules}]


def final_model(stage, size):
    return f"{RUN}/{stage}/{size}/final.pt"


def eval_inputs(wildcards):
    """The final.pt of every model of this size the run trains and the manifests it is checked
    against, plus what scoring needs."""
    models = {stage: final_model(stage, wildcards.size) for stage in MODEL_STAGES}
    return {**models, **{f"{stage}_manifest": os.path.join(os.path.dirname(path), "manifest.json")
                         for stage, path in models.items()},
            "tokens": rules.tokens.output[0], "tokenizer": rules.tokenizer.output.tokenizer,
            "tokenizer_manifest": rules.tokenizer.output.manifest, "mmlu": EVAL_MMLU}


rule export_hf_model:
    input:
        model=final_model("{stage}", "{size}"),
        upstream=f"{RUN}/{{stage}}/{{size}}/manifest.json",  # what final.pt is checked against
        tokenizer=rules.tokenizer.output.tokenizer,
        tokenizer_manifest=rules.tokenizer.output.manifest,
    output:
        weights=f"{RUN}/export_hf/{{stage}}/{{size}}/model.safetensors",
        manifest=f"{RUN}/export_hf/{{stage}}/{{size}}/manifest.json",
    log:
        f"{LOGS}/export_hf/{{stage}}/{{size}}.log",
    benchmark:
        f"{BENCH}/export_hf/{{stage}}/{{size}}.tsv"
    wildcard_constraints:
        stage="|".join(MODEL_STAGES),
        size="[A-Za-z0-9.-]+",
    resources:
        mem_mb=4000,
    params:
        out=lambda wc: f"{RUN}/export_hf/{wc.stage}/{wc.size}",
    shell:
        stage("export-hf", "--model {input.model:q} --tokenizer {input.tokenizer:q} --out {params.out:q}",
              sections=())


rule export_hf:
    input:
        expand(rules.export_hf_model.output.manifest, stage=MODEL_STAGES, size=config["pretrain"]["sizes"]),


rule eval_size:
    input:
        unpack(eval_inputs),
    output:
        json=report(f"{RUN}/eval/{{size}}/eval.json", caption="../workflow/report/eval_json.rst",
                    category="Eval", subcategory="{size}"),
        md=f"{RUN}/eval/{{size}}/eval.md",  # in the Snakemake report as an HTML page (rules/report.smk)
        plot=report(f"{RUN}/eval/{{size}}/eval.png", caption="../workflow/report/eval_plot.rst",
                    category="Eval", subcategory="{size}"),
        manifest=f"{RUN}/eval/{{size}}/manifest.json",
    log:
        f"{LOGS}/eval/{{size}}.log",
    benchmark:
        f"{BENCH}/eval/{{size}}.tsv"
    wildcard_constraints:
        size="[A-Za-z0-9.-]+",
    threads: 1  # a CPU-sized model scores no faster on 2 threads, and 2 threads on a busy machine thrash
    resources:
        mem_mb=4000,
    params:
        config=section("eval"),
        tasks=section("tasks"),
        models=lambda wc: " ".join(f"--model {shlex.quote(f'{s}={final_model(s, wc.size)}')}" for s in MODEL_STAGES),
        tokens=f"{RUN}/tokens",
        text_sources=" ".join(shlex.quote(name) for name in TEXT),  # scored apart from the web shards
        out=lambda wc: f"{RUN}/eval/{wc.size}",
    shell:
        stage("eval", "{params.models} --tokens {params.tokens:q} --tokenizer {input.tokenizer:q} --out {params.out:q}"
                      " --size {wildcards.size} --text-sources {params.text_sources} --threads {threads}",
              sections=("config", "tasks"))


rule eval:
    input:
        expand(rules.eval_size.output.manifest, size=config["pretrain"]["sizes"]),
