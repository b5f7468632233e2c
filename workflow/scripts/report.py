"""Snakemake adapter: render SUMMARY.md, DECISION.md and the figures from the result tables."""

from kvbench.job import start_job

start_job(snakemake.log[0], threads=1)

from pathlib import Path  # noqa: E402

from kvbench.report import write_reports  # noqa: E402

write_reports(
    metrics=snakemake.input.metrics,
    summary=snakemake.input.summary,
    extrapolation=snakemake.input.extrapolation,
    timings=snakemake.input.timings,
    manifests=[Path(p).parent for p in snakemake.input.manifests],
    ablation=list(snakemake.input.ablation),
    quality=list(snakemake.input.quality),
    cfg=snakemake.params.cfg,
    summary_md=snakemake.output.summary_md,
    decision_md=snakemake.output.decision_md,
    figures=list(snakemake.output.figures),
)
