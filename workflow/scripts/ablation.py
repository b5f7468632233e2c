"""Snakemake adapter: the K-side variance_ratio x d_res ablation on one model's capture."""

import logging

from kvbench.job import start_job

start_job(snakemake.log[0], threads=snakemake.threads)
from pathlib import Path  # noqa: E402

from kvbench.ablation import run_ablation  # noqa: E402
from kvbench.tables import write_parquet  # noqa: E402

table = run_ablation(
    Path(snakemake.input.manifest).parent, snakemake.params.settings, snakemake.params.backend
)
write_parquet(table, snakemake.output.table)
logging.info(
    "%d layers x %d cells", table["layer"].nunique(), len(table) // table["layer"].nunique()
)
