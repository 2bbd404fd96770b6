# Inference benchmark: one job (rule inference_bench_size) per model size in inference.sizes
# (`snakemake inference_bench`: every one), serving one seeded workload with
# naive decoding, a KV cache, static and continuous batching, the paged/prefix cache, speculative
# decoding (draft: inference.draft_size, pretrained by this run) and the HTTP server
# (pipeline/inference/bench/, docs/inference.md).

INFERENCE = config["inference"]
# the section without `sizes`: adding a size must not rerun the sizes benchmarked
INFERENCE_PARAMS = json.dumps({k: v for k, v in INFERENCE.items() if k != "sizes"}, sort_keys=True)
# the draft model and the manifest it is checked against, when there is one: named inputs only then
DRAFT = {"draft": f"{RUN}/pretrain/{INFERENCE['draft_size']}/final.pt",
         "draft_manifest": f"{RUN}/pretrain/{INFERENCE['draft_size']}/manifest.json"} if INFERENCE["draft_size"] else {}
# the HF transformers peer runs on the export_hf rule's folder of the same model (rules/eval.smk)
HF_PEER = {"hf": f"{RUN}/export_hf/pretrain/{{size}}/manifest.json"} if "hf_generate" in INFERENCE["systems"] else {}


rule inference_bench_size:
    input:
        model=f"{RUN}/pretrain/{{size}}/final.pt",
        upstream=f"{RUN}/pretrain/{{size}}/manifest.json",  # what final.pt is checked against
        tokenizer=rules.tokenizer.output.tokenizer,
        tokenizer_manifest=rules.tokenizer.output.manifest,
        tokens=rules.tokens.output[0],
        **DRAFT,
        **HF_PEER,
    output:
        json=f"{RUN}/inference_bench/{{size}}/bench.json",
        md=f"{RUN}/inference_bench/{{size}}/bench.md",  # in the Snakemake report as an HTML page (rules/report.smk)
        throughput=report(f"{RUN}/inference_bench/{{size}}/throughput.png",
                          caption="../workflow/report/inference_throughput.rst", category="Inference", subcategory="{size}"),
        latency=report(f"{RUN}/inference_bench/{{size}}/latency.png",
                       caption="../workflow/report/inference_latency.rst", category="Inference", subcategory="{size}"),
        manifest=f"{RUN}/inference_bench/{{size}}/manifest.json",
    log:
        f"{LOGS}/inference_bench/{{size}}.log",
    benchmark:
        f"{BENCH}/inference_bench/{{size}}.tsv"
    wildcard_constraints:
        size="[A-Za-z0-9.-]+",
    threads: 2  # the engine and, for the http system, the server and its client side by side
    resources:
        mem_mb=4000,
    params:
        config=INFERENCE_PARAMS,
        tokens=TOKENS,
        draft=lambda wc, input: f"--draft {input.draft}" if "draft" in input.keys() else "",
        hf=lambda wc, input: f"--hf-model {os.path.dirname(input.hf)}" if "hf" in input.keys() else "",
        out=lambda wc: f"{RUN}/inference_bench/{wc.size}",
    shell:
        stage("inference-bench", "--model {input.model:q} {params.draft} {params.hf} --tokenizer {input.tokenizer:q}"
                                 " --tokens {params.tokens:q} --out {params.out:q}")


rule inference_bench:
    input:
        expand(rules.inference_bench_size.output.manifest, size=INFERENCE["sizes"]),
