"""Concurrent GPU jobs land on distinct cards (needs >= 2 CUDA GPUs and CuPy)."""

import os
import subprocess
import sys
import textwrap

import pytest

from kvbench.backend import _cupy_or_none

cp = _cupy_or_none()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        cp is None or cp.cuda.runtime.getDeviceCount() < 2, reason="needs >= 2 CUDA GPUs + CuPy"
    ),
]

JOB = textwrap.dedent(
    """
    import time
    from kvbench.backend import get_xp
    xp = get_xp("gpu")
    dev = xp.cuda.Device()
    x = xp.ones((1 << 20,), dtype=xp.float32)  # real work on the claimed card
    assert float(x.sum()) == float(1 << 20)
    print(dev.id, dev.pci_bus_id, flush=True)
    time.sleep(3)
    """
)


def test_concurrent_gpu_jobs_use_distinct_cards(tmp_path):
    env = {**os.environ, "KVBENCH_GPU_LOCK_DIR": str(tmp_path)}
    n = cp.cuda.runtime.getDeviceCount()
    procs = [
        subprocess.Popen([sys.executable, "-c", JOB], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    claimed = [p.stdout.readline().split() for p in procs]
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert len({dev for dev, _ in claimed}) == n, claimed
    assert len({bus for _, bus in claimed}) == n, claimed
