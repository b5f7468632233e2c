"""Snakemake adapter: run one codec over one capture and write the codec + timing tables."""

from kvbench.job import start_job

start_job(snakemake.log[0], threads=snakemake.threads)

from kvbench.compress import compress_capture  # noqa: E402
from kvbench.tables import write_parquet  # noqa: E402

table, timing = compress_capture(
    snakemake.params.capture_dir,
    snakemake.wildcards.codec,
    snakemake.params.codecs,
    backend=snakemake.params.backend,
)
write_parquet(table, snakemake.output.table)
write_parquet(timing, snakemake.output.timing)
