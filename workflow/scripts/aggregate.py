"""Snakemake adapter: concatenate every codec/timing table; write metrics, summary, timings."""

import logging

from kvbench.aggregate import aggregate
from kvbench.tables import write_parquet

logging.basicConfig(
    filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
)
metrics, summary, timings = aggregate(snakemake.input.tables, snakemake.input.timings)
write_parquet(metrics, snakemake.output.metrics)
write_parquet(summary, snakemake.output.summary)
write_parquet(timings, snakemake.output.timings)
logging.info("%d rows, %d cells", len(metrics), len(summary))
