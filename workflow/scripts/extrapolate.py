"""Snakemake adapter: project every codec's bytes to the configured long contexts."""

import logging

from kvbench.extrapolate import extrapolate
from kvbench.tables import read_parquet, write_parquet

logging.basicConfig(
    filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
)
table = extrapolate(
    read_parquet(snakemake.input.metrics),
    snakemake.params.targets,
    codecs_cfg=snakemake.params.codecs,
    summary=read_parquet(snakemake.input.summary),
)
write_parquet(table, snakemake.output.table)
logging.info("%d cells (%d projected)", len(table), int((table["source"] != "measured").sum()))
