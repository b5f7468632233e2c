"""Snakemake adapter: fetch, verify (and convert) one model's weights via kvbench.models.fetch."""

import logging
import os
import sys

if not snakemake.params.allow_download:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported

# Library warnings and progress bars go to the log too (kept open for the whole job).
sys.stderr = open(snakemake.log[0], "a", buffering=1)  # noqa: SIM115
logging.basicConfig(
    stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
)

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
