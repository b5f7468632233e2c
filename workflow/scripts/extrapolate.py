"""Snakemake adapter: project every codec's bytes to the configured long contexts."""

import logging

from kvbench.job import start_job

start_job(snakemake.log[0], threads=1)

from kvbench.extrapolate import extrapolate  # noqa: E402
from kvbench.tables import read_parquet, write_parquet  # noqa: E402

table = extrapolate(
    read_parquet(snakemake.input.metrics),
    snakemake.params.targets,
    codecs_cfg=snakemake.params.codecs,
    summary=read_parquet(snakemake.input.summary),
)
write_parquet(table, snakemake.output.table)
logging.info("%d cells (%d projected)", len(table), int((table["source"] != "measured").sum()))
