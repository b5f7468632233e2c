"""Snakemake adapter: capture one model's KV cache at one context length via kvbench.capture."""

import logging
import os
import sys
from pathlib import Path

if not snakemake.params.capture["allow_download"]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported

# Library warnings and progress bars go to the log too (kept open for the whole job).
sys.stderr = open(snakemake.log[0], "a", buffering=1)  # noqa: SIM115
logging.basicConfig(
    stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
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
