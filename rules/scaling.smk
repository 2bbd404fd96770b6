# The scaling sweep: one ordinary pretrain job per (budget, size) of the plan (pipeline/scaling/sweep.py:
# D = C / 6N tokens, rounded to whole optimizer steps), into {SCALING}/runs/{budget}/{size}/, then
# one fit over the manifests the plan names. Like `pretrain`, each run resumes from its checkpoints
# and, on SLURM, asks for scaling.pretrain's nproc GPUs; the runs fan out over the cluster.
#
#   python -m pipeline scaling-plan --configfile workflow/configs/cluster.yaml   # runs, GPU-hours
from pipeline.scaling.sweep import plan_sweep, run_config, sweep_pretrain, sweep_runs

SCALING = f"{RUN}/scaling"
SWEEP_PRETRAIN = sweep_pretrain(config)  # the pretrain section with scaling.pretrain's overrides
SWEEP = sweep_runs(config["scaling"])  # [(budget, size)]: known without building a model


def sweep_run_config(wildcards):
    """The run's pretrain config as JSON: max_steps and warmup from its budget (the plan counts N
    on a meta-device model, so only jobs in the DAG pay for importing torch)."""
    plan = plan_sweep(config["scaling"], SWEEP_PRETRAIN, config["tokenizer"]["vocab_size"])
    run = next(r for r in plan if (r["budget"], r["size"]) == (wildcards.budget, wildcards.size))
    return json.dumps(run_config(SWEEP_PRETRAIN, run), sort_keys=True)


rule scaling_run:
    input:
        tokens=rules.tokens.output[0],
        tokenizer=rules.tokenizer.output.tokenizer,
        tokenizer_manifest=rules.tokenizer.output.manifest,
    output:
        model=f"{SCALING}/runs/{{budget}}/{{size}}/final.pt",
        metrics=f"{SCALING}/runs/{{budget}}/{{size}}/metrics.jsonl",
        loss=f"{SCALING}/runs/{{budget}}/{{size}}/loss.png",
        samples=f"{SCALING}/runs/{{budget}}/{{size}}/samples.md",
        manifest=f"{SCALING}/runs/{{budget}}/{{size}}/manifest.json",
    log:
        f"{LOGS}/scaling_run/{{budget}}/{{size}}.log",
    benchmark:
        f"{BENCH}/scaling_run/{{budget}}/{{size}}.tsv"
    wildcard_constraints:
        budget="[A-Za-z0-9.]+",
        size="[A-Za-z0-9.-]+",
    # on CPU one thread a run, so `--cores 2` trains two tiny runs at once (each barely uses two)
    threads: 8 * SWEEP_PRETRAIN["nproc"] if SWEEP_PRETRAIN["device"] == "cuda" else 1
    resources:
        nproc=SWEEP_PRETRAIN["nproc"],
        gpu=SWEEP_PRETRAIN["nproc"] if SWEEP_PRETRAIN["device"] == "cuda" else 0,
        mem_mb=8000 * SWEEP_PRETRAIN["nproc"],
    params:
        config=sweep_run_config,
        data=f"{RUN}/tokens",
        out=lambda wc: f"{SCALING}/runs/{wc.budget}/{wc.size}",
    shell:
        stage("pretrain", "--data {params.data:q} --out {params.out:q} --size {wildcards.size}"
                          " --tokenizer {input.tokenizer:q}",
              launcher="OMP_NUM_THREADS={threads} " + torchrun(1, SWEEP_PRETRAIN["nproc"]))


rule scaling_fit:
    input:
        runs=[f"{SCALING}/runs/{budget}/{size}/manifest.json" for budget, size in SWEEP],
    output:
        fit=f"{SCALING}/fit.json",
        report=f"{SCALING}/fit.md",
        isoflop=report(f"{SCALING}/isoflop.png", caption="../workflow/report/scaling_isoflop.rst", category="Scaling"),
        curves=report(f"{SCALING}/fit.png", caption="../workflow/report/scaling_fit.rst", category="Scaling"),
        frontier=report(f"{SCALING}/frontier.png", caption="../workflow/report/scaling_frontier.rst",
                        category="Scaling"),
        plan=f"{SCALING}/plan.json",
        manifest=f"{SCALING}/manifest.json",
    log:
        f"{LOGS}/scaling_fit.log",
    benchmark:
        f"{BENCH}/scaling_fit.tsv"
    resources:
        mem_mb=2000,
    params:
        config=section("scaling"),
        pretrain=json.dumps(SWEEP_PRETRAIN, sort_keys=True),
        vocab_size=config["tokenizer"]["vocab_size"],
        runs=f"{SCALING}/runs",
        out=SCALING,
    shell:
        stage("scaling-fit", "--runs {params.runs:q} --out {params.out:q} --pretrain {params.pretrain:q}"
                             " --vocab-size {params.vocab_size}")
