# Aggregate every codec table, project bytes to long contexts, render SUMMARY.md / DECISION.md and
# the figures. All three read only Parquet tables and capture manifests (helpers: kvbench.report).
from kvbench.report import figure_outputs, report_params, workflow_inputs

REPORT_INPUTS = workflow_inputs(config)


report: "../report/workflow.rst"


localrules:
    aggregate,
    extrapolate,
    report,


rule aggregate:
    input:
        tables=REPORT_INPUTS["tables"],
        timings=REPORT_INPUTS["timings"],
    output:
        metrics="results/metrics.parquet",
        summary="results/summary.parquet",
        timings="results/timings.parquet",
    log:
        "logs/aggregate.log",
    benchmark:
        "benchmarks/aggregate.tsv"
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/aggregate.py"


rule extrapolate:
    input:
        metrics="results/metrics.parquet",
        summary="results/summary.parquet",
    output:
        table="results/extrapolation.parquet",
    params:
        targets=report_params(config)["report"].get(
            "extrapolate_ctx", [16384, 32768, 65536, 131072]
        ),
        codecs=report_params(config)["codecs"],
    log:
        "logs/extrapolate.log",
    benchmark:
        "benchmarks/extrapolate.tsv"
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/extrapolate.py"


rule report:
    input:
        metrics="results/metrics.parquet",
        summary="results/summary.parquet",
        timings="results/timings.parquet",
        extrapolation="results/extrapolation.parquet",
        manifests=REPORT_INPUTS["manifests"],
        ablation=REPORT_INPUTS["ablation"],
        # optional: the quality stage's tables (quality.smk's quality_targets(), looked up when the
        # DAG is built, so include order does not matter); the report's quality block renders
        # only when they are given
        quality=lambda wc: quality_targets() if "quality_targets" in globals() else [],
    output:
        summary_md=report(
            "results/SUMMARY.md", caption="../report/summary.rst", category="Reports"
        ),
        decision_md=report(
            "results/DECISION.md", caption="../report/decision.rst", category="Reports"
        ),
        figures=[
            report(path, caption=caption, category=category, labels=labels)
            for path, caption, category, labels in figure_outputs(MODELS)
        ],
    params:
        cfg=report_params(config),
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/report.py"
