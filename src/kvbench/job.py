"""Process setup shared by every Snakemake job script; call it before numpy/torch are imported.

- BLAS/OpenMP pools sized to the job's ``threads:`` (Snakemake sets these for ``shell:`` rules
  only; OpenBLAS threads spinning between the many small matmuls of the codecs and metrics made
  encodes 10-30x slower on a shared 2-core machine);
- the model hub kept offline unless the config allows downloads;
- library warnings, progress bars and logging into the job's ``log:`` file.
"""

from __future__ import annotations

import logging
import os
import sys

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def start_job(log_path: str, threads: int | None = None, allow_download: bool = False) -> None:
    """Configure this job process; the environment set by the user always wins."""
    if threads is not None:
        for var in _THREAD_VARS:
            os.environ.setdefault(var, str(threads))
    if not allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.stderr = open(log_path, "a", buffering=1)  # noqa: SIM115  (open for the job's lifetime)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
