"""Size BLAS/OpenMP thread pools to a job; must run before numpy is first imported.

Snakemake sets these variables for ``shell:`` rules only. OpenBLAS threads spinning between the
many small matmuls of the codecs and metrics cost far more CPU than they save on a shared machine
(10-30x slower encodes were measured on 2 cores).
"""

import os

_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pin_blas_threads(n: int) -> None:
    """Use ``n`` BLAS threads unless the user already chose (environment wins)."""
    for var in _VARS:
        os.environ.setdefault(var, str(n))
