"""Concurrent GPU jobs land on distinct cards (needs >= 2 CUDA GPUs and CuPy)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvbench.backend import _cupy_or_none

ROOT = Path(__file__).resolve().parents[1]

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


SNAKEFILE = """\
rule all:
    input: expand("claim{{i}}.json", i=range({n}))

rule gpu_job:
    output: "claim{{i}}.json"
    resources: gpu=1
    shell: "{python} job.py {{output}}"
"""

SNAKE_JOB = textwrap.dedent(
    """
    import json, sys, time
    from kvbench.backend import get_xp
    xp = get_xp("gpu")
    start = time.time()
    dev = xp.cuda.Device()
    x = xp.arange(1 << 22, dtype=xp.float64)  # real work on the claimed card
    assert float((x * 2).sum()) == float((1 << 22) * ((1 << 22) - 1))
    time.sleep(5)  # hold the card so the N jobs overlap
    claim = {"dev": dev.id, "bus": dev.pci_bus_id, "start": start, "end": time.time()}
    open(sys.argv[1], "w").write(json.dumps(claim))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("snakemake") is None, reason="needs snakemake")
def test_snakemake_gpu_jobs_use_distinct_cards(tmp_path):
    """Issue #6 end to end: Snakemake only counts `resources: gpu=1` against `--resources gpu=N`
    and assigns no device ids, so N concurrent jobs calling get_xp("gpu") must each win their own
    card from the file-lock pool. The workflow profile (gpu: 1) is loaded too, to show that the
    command-line --resources replaces it (else the jobs would run one at a time)."""
    n = cp.cuda.runtime.getDeviceCount()
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(n=n, python=sys.executable))
    (tmp_path / "job.py").write_text(SNAKE_JOB)
    shutil.copytree(ROOT / "profiles" / "default", tmp_path / "profiles" / "default")
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "KVBENCH_GPU_LOCK_DIR": str(tmp_path / "locks")}
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(n), "--resources", f"gpu={n}"]
    proc = subprocess.run(
        [*cmd, "--workflow-profile", "profiles/default"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    claims = [json.loads((tmp_path / f"claim{i}.json").read_text()) for i in range(n)]
    print(claims)
    assert max(c["start"] for c in claims) < min(c["end"] for c in claims), claims  # overlapped
    assert len({c["dev"] for c in claims}) == n, claims
    assert len({c["bus"] for c in claims}) == n, claims
