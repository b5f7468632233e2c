"""One launch per Jacobi plan, for Nsight Compute: ``ncu ... python tools/gpu_eigh_prof.py``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cupy as cp  # noqa: E402
from gpu_eigh_bench import K, make_spd  # noqa: E402

for d, nb, plan in (
    (64, 1056, K.JacobiPlan("regs", False, 128)),
    (128, 528, K.JacobiPlan("regs", False, 512)),
):
    a = make_spd(cp, nb, d, seed=5)
    w = cp.empty((nb, d), dtype=cp.float32)
    v = cp.empty((nb, d, d), dtype=cp.float32)
    K._jacobi_cupy(cp, a, w, v, plan, 1e-6, 20)
    cp.cuda.Device().synchronize()
