"""Snakemake adapter: continuation quality of one codec on one capture (kvbench.quality)."""

import logging
import sys

from kvbench.job import start_job

start_job(
    snakemake.log[0], threads=snakemake.threads, allow_download=snakemake.params.allow_download
)

from kvbench.errors import KvbenchError  # noqa: E402
from kvbench.quality import run_quality  # noqa: E402
from kvbench.tables import write_parquet  # noqa: E402

try:
    table, _ = run_quality(
        snakemake.params.capture_dir,
        snakemake.wildcards.model,
        snakemake.params.model_cfg,
        snakemake.wildcards.codec,
        snakemake.params.codecs,
        corpus_name=snakemake.params.corpus,
        n_tokens=int(snakemake.params.n_tokens),
        backend=snakemake.params.backend,
        model_dir=snakemake.params.model_dir,
        threads=snakemake.threads,
        attention=bool(snakemake.params.attention),
        allow_download=bool(snakemake.params.allow_download),
    )
except KvbenchError as e:
    logging.error("%s", e)
    sys.stderr = sys.__stderr__
    raise SystemExit(f"kvbench: {e}") from None
write_parquet(table, snakemake.output.table)
