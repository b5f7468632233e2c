"""Backend selection and the file-lock GPU pool (simulated device list: runs without a GPU)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvbench.backend import _cupy_or_none, get_xp
from kvbench.errors import KvbenchError

CLAIM = textwrap.dedent(
    """
    import sys, time
    from kvbench.backend import acquire_device
    dev = acquire_device([0, 1], timeout_s=float(sys.argv[1]), poll_s=0.05)
    print(dev, flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def _claim(tmp_path, timeout, hold):
    env = {**os.environ, "KVBENCH_GPU_LOCK_DIR": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(timeout), str(hold)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_jobs_get_distinct_devices_and_a_third_waits(tmp_path):
    a, b = _claim(tmp_path, 5, 1.5), _claim(tmp_path, 5, 1.5)
    first = {a.stdout.readline().strip(), b.stdout.readline().strip()}
    assert first == {"0", "1"}
    c = _claim(tmp_path, 10, 0)  # must wait for a or b to exit, then get a freed device
    assert c.stdout.readline().strip() in {"0", "1"}
    for p in (a, b, c):
        assert p.wait(timeout=20) == 0, p.stderr.read()


def test_pool_times_out_with_a_clear_error(tmp_path):
    holders = [_claim(tmp_path, 5, 3) for _ in range(2)]
    for h in holders:
        h.stdout.readline()
    late = _claim(tmp_path, 0.3, 0)
    assert late.wait(timeout=20) != 0
    assert "no free GPU among [0, 1]" in late.stderr.read()
    for h in holders:
        h.wait(timeout=20)


def test_cpu_and_auto_fallback(caplog):
    assert get_xp("cpu") is np
    if _cupy_or_none() is None:
        assert get_xp("auto") is np
        assert "running on CPU" in caplog.text
        with pytest.raises(KvbenchError, match="no CUDA GPU"):
            get_xp("gpu")


def test_unknown_backend():
    with pytest.raises(KvbenchError, match="backend must be one of"):
        get_xp("tpu")
