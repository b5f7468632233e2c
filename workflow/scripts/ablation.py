"""Snakemake adapter: the K-side variance_ratio x d_res ablation on one model's capture."""

import logging
from pathlib import Path

from kvbench.ablation import run_ablation
from kvbench.tables import write_parquet

logging.basicConfig(
    filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
)
table = run_ablation(
    Path(snakemake.input.manifest).parent, snakemake.params.settings, snakemake.params.backend
)
write_parquet(table, snakemake.output.table)
logging.info(
    "%d layers x %d cells", table["layer"].nunique(), len(table) // table["layer"].nunique()
)
