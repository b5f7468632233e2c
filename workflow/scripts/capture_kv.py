"""Snakemake adapter: capture one model's KV cache at one context length via kvbench.capture."""

import logging
import sys
from pathlib import Path

from kvbench.job import start_job

start_job(
    snakemake.log[0],
    threads=snakemake.threads,
    allow_download=snakemake.params.capture["allow_download"],
)

from kvbench.capture import capture_kv  # noqa: E402
from kvbench.errors import KvbenchError  # noqa: E402

model = snakemake.wildcards.model
cfg = {
    "seed": snakemake.params.seed,
    "models": {model: snakemake.params.model_cfg},
    "capture": snakemake.params.capture,
    "corpus": snakemake.params.corpus,
}
try:
    capture_kv(
        model,
        cfg,
        int(snakemake.wildcards.ctx),
        snakemake.params.model_dir,
        Path(snakemake.output.manifest).parent,
        threads=snakemake.threads,
    )
except KvbenchError as e:
    logging.error("%s", e)
    sys.stderr = sys.__stderr__
    raise SystemExit(f"kvbench: {e}") from None
