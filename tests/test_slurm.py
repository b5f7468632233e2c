"""Cluster execution on a real single-node SLURM (tests/slurm/setup_slurm.sh), marker ``slurm``.

Run with ``pytest -m slurm tests/test_slurm.py`` as root on a Debian-family machine (the setup
script apt-installs slurm-wlm + munge and starts the daemons). Skips, with the reason, when that
is impossible here: not root, no apt/dpkg, or the setup script exits 77 -- unless
KVBENCH_REQUIRE_SLURM=1 (CI), which turns those skips into failures.

* test_slurm_profile_matches_local: ``snakemake --profile profiles/slurm`` on a small target of
  the embedded default (SmolLM2 capture at ctx 2048 + the q8_0 codec and quality tables) in a
  temp copy of the workflow. Every non-local job must have gone through sbatch (plugin log +
  ``scontrol``), and the outputs must be byte-identical to a plain local run (``--cores 2``) in
  a second copy.
* test_slurm_gpu_profile_is_not_throttled: profiles/slurm-gpu (adapted to the test cluster's fake
  GPUs) on a toy workflow with kvbench's rule names: GPU rules land on partition ``gpu`` with one
  GPU each, CPU rules on ``debug`` without GPUs, and GPU jobs run concurrently although the
  auto-loaded profiles/default limits ``gpu`` to 1 (the trap in specs/anchors.md A4).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "tests" / "slurm" / "setup_slurm.sh"
SKIP_RC = 77

MODEL, CTX, CODEC = "smollm2-135m", 2048, "q8_0"
KV_DIR = f"results/kv/{MODEL}/ctx{CTX}"
TARGETS = [
    f"{KV_DIR}/manifest.json",
    f"results/codec/{MODEL}/ctx{CTX}/{CODEC}.parquet",
    f"results/quality/{MODEL}/ctx{CTX}/{CODEC}.parquet",
]
# Rules that must run as SLURM jobs for TARGETS (fetch_model is a localrule: never submitted).
SUBMITTED_RULES = {"capture_kv", "compress", "quality"}
# Poll SLURM every few seconds instead of the plugin's 40 s start delay; keep the job logs.
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs"]
RUN_TIMEOUT = 900


# ---- helpers ---------------------------------------------------------------------------------
def _snakemake(args: list[str], cwd: Path, timeout: int = RUN_TIMEOUT) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "snakemake", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    dt = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((cwd / ".snakemake" / "slurm_logs").rglob("*.log"))
        )
        pytest.fail(
            f"`{' '.join(cmd)}` failed in {cwd} (rc {proc.returncode}):\n{out[-6000:]}\n{logs}"
        )
    return dt, out


def _workflow_copy(dst: Path) -> Path:
    """The workflow's files in ``dst``; resources/ (model weights) shared with the repo."""
    dst.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copy2(ROOT / "Snakefile", dst / "Snakefile")
    for sub in ("config", "workflow", "profiles", "envs"):
        if (ROOT / sub).is_dir():
            shutil.copytree(ROOT / sub, dst / sub, ignore=ignore)
    (ROOT / "resources").mkdir(exist_ok=True)
    (dst / "resources").symlink_to(ROOT / "resources", target_is_directory=True)
    return dst


def _submitted_jobs(workdir: Path) -> dict[str, str]:
    """SLURM job id -> rule, from the plugin's 'submitted with SLURM jobid' log lines."""
    jobs: dict[str, str] = {}
    pat = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
    for log in (workdir / ".snakemake" / "log").glob("*.snakemake.log"):
        for jobid, slurm_log in pat.findall(log.read_text()):
            rule = re.search(r"slurm_logs/rule_([A-Za-z0-9_]+)/", slurm_log)
            jobs[jobid] = rule.group(1) if rule else "?"
    return jobs


def _scontrol(jobid: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _ts(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def _check_through_sbatch(workdir: Path, expected_rules: set[str]) -> dict[str, dict[str, str]]:
    """Every expected rule was submitted, SLURM ran it to completion in ``workdir``."""
    jobs = _submitted_jobs(workdir)
    assert set(jobs.values()) == expected_rules, f"submitted rules {jobs} != {expected_rules}"
    info = {}
    for jobid, rule in jobs.items():
        job = _scontrol(jobid)
        assert job["JobState"] == "COMPLETED", f"SLURM job {jobid} ({rule}): {job}"
        assert job["ExitCode"] == "0:0"
        assert Path(job["WorkDir"]).resolve() == workdir.resolve()
        assert job["Comment"].startswith(f"rule_{rule}"), job["Comment"]
        assert list((workdir / ".snakemake" / "slurm_logs").rglob(f"{jobid}.log"))
        info[jobid] = {**job, "rule": rule}
    return info


# ---- fixtures ----------------------------------------------------------------------------------
def _skip(reason: str):
    """Skip -- or fail where SLURM is known to work (CI sets KVBENCH_REQUIRE_SLURM=1)."""
    if os.environ.get("KVBENCH_REQUIRE_SLURM") == "1":
        pytest.fail(f"KVBENCH_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster() -> str:
    if os.geteuid() != 0:
        _skip("SLURM test needs root (installs slurm-wlm and starts daemons)")
    if not (shutil.which("dpkg") and shutil.which("apt-get")):
        _skip("SLURM test needs dpkg + apt-get (Debian-family system)")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    dt = time.monotonic() - t0
    if proc.returncode == SKIP_RC:
        reason = (proc.stderr.strip().splitlines() or ["(no reason given)"])[-1]
        print(f"setup_slurm.sh: {proc.stderr}")
        _skip(f"cannot run SLURM here: {reason}")
    assert proc.returncode == 0, f"setup_slurm.sh failed (rc {proc.returncode}):\n{proc.stderr}"
    sinfo = subprocess.run(
        ["sinfo", "-h", "-o", "%P %a %D %t %G"], capture_output=True, text=True
    ).stdout
    print(f"SLURM ready after {dt:.1f} s:\n{sinfo}")
    return sinfo


# ---- tests -------------------------------------------------------------------------------------
@pytest.mark.workflow
@pytest.mark.model
def test_slurm_profile_matches_local(slurm_cluster, smollm2_dir, tmp_path):
    cluster = _workflow_copy(tmp_path / "cluster")
    local = _workflow_copy(tmp_path / "local")

    t_slurm, out = _snakemake(["--profile", "profiles/slurm", *FAST_POLL, *TARGETS], cluster)
    assert "profiles/slurm and workflow specific profile profiles/default" in out
    jobs = _check_through_sbatch(cluster, SUBMITTED_RULES)
    for job in jobs.values():
        assert job["Partition"] == "debug"
        assert "gpu" not in job.get("TresPerJob", "")

    t_local, _ = _snakemake(["--cores", "2", *TARGETS], local)
    assert not (local / ".snakemake" / "slurm_logs").exists()

    # Byte-identical: the capture (shards + manifest) and the codec table. results/timing/ is
    # wall-clock by contract and excluded.
    compared = []
    for rel in [*TARGETS, *(p.relative_to(cluster) for p in (cluster / KV_DIR).iterdir())]:
        a, b = cluster / rel, local / rel
        assert b.is_file(), f"local run lacks {rel}"
        assert a.read_bytes() == b.read_bytes(), f"{rel} differs between SLURM and local runs"
        compared.append(str(rel))
    print(
        f"SLURM run {t_slurm:.0f} s, local run {t_local:.0f} s; "
        f"{len(set(compared))} files byte-identical; SLURM jobs: "
        + ", ".join(f"{j}={v['rule']}@{v['Partition']}" for j, v in sorted(jobs.items()))
    )


TOY_SNAKEFILE = """\
# Toy workflow with kvbench's rule names: exercises the profiles, not the pipeline.
rule all:
    input: expand("out/{i}.c", i=range(3)), "out/agg.txt"

rule capture_kv:
    output: "out/{i}.a"
    resources: gpu=1
    shell: "echo gpus=$CUDA_VISIBLE_DEVICES > {output}; sleep 6"

rule compress:
    input: "out/{i}.a"
    output: "out/{i}.c"
    shell: "cat {input} > {output}; sleep 2"

rule aggregate:
    input: expand("out/{i}.c", i=range(3))
    output: "out/agg.txt"
    shell: "cat {input} > {output}"
"""


def _fit_gpu_profile_to_test_cluster(src: Path, dst: Path) -> None:
    """profiles/slurm-gpu with the test cluster's GPU type and sizes (2 CPUs, 2 fake GPUs)."""
    prof = yaml.safe_load(src.read_text())
    prof.pop("config", None)  # the toy workflow has no config
    for res in prof["set-resources"].values():
        if "gpu_model" in res:
            res["gpu_model"] = "kvfake"
        if "mem_mb" in res:
            res["mem_mb"] = 1000
    prof["default-resources"]["mem_mb"] = 1000
    dst.mkdir(parents=True)
    (dst / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))


def test_slurm_gpu_profile_is_not_throttled(slurm_cluster, tmp_path):
    if " gpu " not in f" {slurm_cluster} ".replace("\n", " "):
        pytest.skip("test cluster has no fake-GPU partition (KVBENCH_SLURM_FAKE_GPUS=0)")
    wd = tmp_path / "toy"
    wd.mkdir()
    (wd / "Snakefile").write_text(TOY_SNAKEFILE)
    # The real workflow profile (auto-loaded, gpu=1 locally) + the adapted GPU profile.
    shutil.copytree(ROOT / "profiles" / "default", wd / "profiles" / "default")
    _fit_gpu_profile_to_test_cluster(
        ROOT / "profiles" / "slurm-gpu" / "config.yaml", wd / "profiles" / "slurm-gpu-test"
    )

    t, out = _snakemake(["--profile", "profiles/slurm-gpu-test", *FAST_POLL], wd, timeout=600)
    assert "workflow specific profile profiles/default" in out
    jobs = _check_through_sbatch(wd, {"capture_kv", "compress", "aggregate"})
    gpu_jobs = {j: v for j, v in jobs.items() if v["rule"] in ("capture_kv", "compress")}
    for job in gpu_jobs.values():
        assert job["Partition"] == "gpu"
        assert "gpu:kvfake:1" in job["TresPerJob"], job["TresPerJob"]
    (agg,) = [v for v in jobs.values() if v["rule"] == "aggregate"]
    assert agg["Partition"] == "debug" and "gpu" not in agg.get("TresPerJob", "")

    # Not throttled: some two GPU jobs ran at the same time (the default profile's gpu=1 would
    # serialise them: each submitted only after the previous one ended). Needs 2 CPUs on the node
    # (each toy job takes one CPU and one of the 2 fake GPUs).
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True)
    cpus = int(sinfo.stdout.split()[0])
    if cpus < 2:
        pytest.skip(f"node has {cpus} CPU: two jobs cannot overlap, concurrency not testable")
    spans = sorted((_ts(v["StartTime"]), _ts(v["EndTime"]), j) for j, v in gpu_jobs.items())
    overlaps = [(a[2], b[2]) for i, a in enumerate(spans) for b in spans[i + 1 :] if b[0] < a[1]]
    assert overlaps, f"GPU jobs never overlapped (throttled to one?): {spans}"
    print(f"slurm-gpu toy run {t:.0f} s; concurrent GPU jobs: {overlaps}")
