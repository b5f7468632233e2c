"""Snakemake adapter: fetch, verify (and convert) one model's weights via kvbench.models.fetch."""

import logging
import sys

from kvbench.job import start_job

start_job(snakemake.log[0], allow_download=snakemake.params.allow_download)

from kvbench.errors import KvbenchError  # noqa: E402
from kvbench.models import fetch  # noqa: E402

try:
    fetch(
        snakemake.wildcards.model,
        snakemake.params.model_cfg,
        snakemake.params.model_dir,
        allow_download=snakemake.params.allow_download,
    )
except KvbenchError as e:
    logging.error("%s", e)
    sys.stderr = sys.__stderr__
    raise SystemExit(f"kvbench: {e}") from None
