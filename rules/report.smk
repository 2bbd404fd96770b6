# The report card: the run on one page, {RUN}/report_card/index.html (pipeline/report_card.py), from the
# manifests of the stages it shows (each artifact is checked against its manifest's sha256), plus
# every stage's Markdown table as an HTML page under {RUN}/report_card/tables/. All go into
# `snakemake --report`: the card as one self-contained HTML result (its plots embedded, so it works
# in an .html report too, where Snakemake refuses a folder with `htmlindex`), the tables inline in
# their stage's category. Included last: it reads every stage's outputs.
from pipeline.report_card import table_page

REPORT = f"{RUN}/report_card"
SIZES = config["pretrain"]["sizes"]


def per_size(pattern, sizes=SIZES):
    return expand(pattern, size=sizes)


# every Markdown table: (its path, its category in the Snakemake report, subcategory, caption file)
CARD_TABLES = [
    (rules.data_report.output.md, "Data", None, "drop_report"),
    (rules.tokenizer.output.report, "Tokenizer", None, "tokenizer_compression"),
    *[(md, stage, size, "samples") for stage, rule in (("Pretrain", rules.pretrain_size), ("SFT", rules.sft_size),
                                                       ("GRPO", rules.grpo_size))
      for size, md in zip(SIZES, per_size(rule.output.samples))],
    *[(md, "Eval", size, "eval_table") for size, md in zip(SIZES, per_size(rules.eval_size.output.md))],
    *[(md, "Inference", size, "inference_bench")
      for size, md in zip(INFERENCE["sizes"], per_size(rules.inference_bench_size.output.md, INFERENCE["sizes"]))],
    (rules.scaling_fit.output.report, "Scaling", None, "scaling_report"),
]
CARD_TABLE_PAGES = {
    f"table{i}": report(str(table_page(md, REPORT)), caption=f"../workflow/report/{caption}.rst", category=category,
                        subcategory=subcategory)
    for i, (md, category, subcategory, caption) in enumerate(CARD_TABLES)
}


rule report_card:
    input:
        data=rules.data_report.output.manifest,
        tokenizer=rules.tokenizer.output.manifest,
        pretrain=per_size(rules.pretrain_size.output.manifest),
        sft=per_size(rules.sft_size.output.manifest),  # its samples.md is checked against it
        grpo=per_size(rules.grpo_size.output.manifest),
        eval=per_size(rules.eval_size.output.manifest),
        inference=per_size(rules.inference_bench_size.output.manifest, INFERENCE["sizes"]),
        scaling=rules.scaling_fit.output.manifest,
    output:
        html=report(f"{REPORT}/index.html", caption="../workflow/report/report_card.rst", category="Report card"),
        manifest=f"{REPORT}/manifest.json",
        **CARD_TABLE_PAGES,
    log:
        f"{LOGS}/report_card.log",
    benchmark:
        f"{BENCH}/report_card.tsv"
    params:
        out=REPORT,
        tables=[md for md, *_ in CARD_TABLES],
    shell:
        stage("report-card", "--out {params.out:q} --data {input.data:q} --tokenizer {input.tokenizer:q}"
                             " --pretrain {input.pretrain:q} --eval {input.eval:q} --grpo {input.grpo:q}"
                             " --inference {input.inference:q} --scaling {input.scaling:q} --tables {params.tables:q}",
              sections=())
