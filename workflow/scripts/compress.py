"""Snakemake adapter: run one codec over one capture and write the codec + timing tables."""

import logging

from kvbench.blas import pin_blas_threads

pin_blas_threads(snakemake.threads)  # before numpy is imported

from kvbench.compress import compress_capture  # noqa: E402
from kvbench.tables import write_parquet  # noqa: E402

logging.basicConfig(
    filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
)
table, timing = compress_capture(
    snakemake.params.capture_dir,
    snakemake.wildcards.codec,
    snakemake.params.codecs,
    backend=snakemake.params.backend,
)
write_parquet(table, snakemake.output.table)
write_parquet(timing, snakemake.output.timing)
