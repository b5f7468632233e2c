"""Snakemake adapter: concatenate every codec/timing table; write metrics, summary, timings."""

import logging

from kvbench.job import start_job

start_job(snakemake.log[0], threads=1)

from kvbench.aggregate import aggregate  # noqa: E402
from kvbench.tables import write_parquet  # noqa: E402

metrics, summary, timings = aggregate(snakemake.input.tables, snakemake.input.timings)
write_parquet(metrics, snakemake.output.metrics)
write_parquet(summary, snakemake.output.summary)
write_parquet(timings, snakemake.output.timings)
logging.info("%d rows, %d cells", len(metrics), len(summary))
