"""Snakemake profiles (profiles/*/config.yaml): shape, pickup by Snakemake 9, the local GPU guard.

Fast (no SLURM needed). The cluster side -- jobs through sbatch, GPU jobs not throttled -- is
tests/test_slurm.py (marker ``slurm``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "profiles"
RULES = ROOT / "workflow" / "rules"
GPU_RULES = {"capture_kv", "compress", "quality"}
# ablation runs the codecs with config `backend`, so slurm-gpu (backend: gpu) gives it a GPU too.
GPU_RULES_GPU_PROFILE = GPU_RULES | {"ablation"}
CPU_RULES = {"aggregate", "extrapolate", "report"}
# Flags the SLURM plugin manages itself and rejects inside slurm_extra (anchors A5).
FORBIDDEN_EXTRA = re.compile(
    r"--(gres|gpus|mem|time|partition|qos|account|cpus|ntasks|nodes)\b|-[ptA] "
)


def load(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def workflow_rules() -> tuple[set[str], set[str]]:
    """(rules, localrules) declared in workflow/rules/*.smk."""
    rules, local = set(), set()
    for smk in RULES.glob("*.smk"):
        text = smk.read_text()
        rules |= set(re.findall(r"^(?:rule|checkpoint)\s+(\w+)\s*:", text, re.M))
        for block in re.findall(r"^localrules\s*:\s*((?:.*\n?)(?:[ \t]+.*\n?)*)", text, re.M):
            local |= set(re.findall(r"\w+", block))
    return rules, local


@pytest.mark.parametrize("name", ["default", "slurm", "slurm-gpu"])
def test_one_profile_file_per_profile(name):
    """Snakemake 9.27 reads profile.yaml or config.yaml (optionally .vN+); with several
    candidates of the same version it picks one by directory order -- keep exactly one."""
    files = [
        p.name
        for p in (PROFILES / name).iterdir()
        if re.fullmatch(r"(profile|config)(\.v\d+\+)?\.yaml", p.name)
    ]
    assert files == ["config.yaml"], files


def test_default_profile_local_gpu_guard_is_cluster_safe():
    prof = load("default")
    assert "executor" not in prof
    assert prof["resources"] == {"gpu": 1}
    # local scope: tallied by the local executor, ignored by cluster executors (the A4 trap)
    assert prof["set-resource-scopes"] == {"gpu": "local"}
    for key in ("rerun-incomplete", "printshellcmds", "show-failed-logs"):
        assert prof[key] is True


@pytest.mark.parametrize("name", ["slurm", "slurm-gpu"])
def test_cluster_profile_shape(name):
    prof = load(name)
    assert prof["executor"] == "slurm"
    assert prof["slurm-status-command"] == "squeue"
    assert prof["slurm-no-account"] is True
    assert isinstance(prof["jobs"], int) and prof["jobs"] > 1
    # A global gpu limit here would throttle the cluster (and be overridden by default/ anyway).
    assert "resources" not in prof
    assert {"slurm_partition", "mem_mb", "runtime"} <= set(prof["default-resources"])
    for rule, res in prof["set-resources"].items():
        assert not FORBIDDEN_EXTRA.search(str(res.get("slurm_extra", ""))), rule
        assert isinstance(res.get("runtime", 1), int), f"{rule}: runtime in minutes"


def test_slurm_profile_requests_no_gpu():
    prof = load("slurm")
    assert "gpu" not in prof["default-resources"]
    for rule in GPU_RULES:
        assert prof["set-resources"][rule]["gpu"] == 0, rule
    assert not any(r.get("gpu", 0) for r in prof["set-resources"].values())
    assert not any("gpu_model" in r or "gres" in r for r in prof["set-resources"].values())


def test_slurm_gpu_profile_splits_gpu_and_cpu_rules():
    prof = load("slurm-gpu")
    cpu_partition = prof["default-resources"]["slurm_partition"]
    for rule in GPU_RULES_GPU_PROFILE:
        res = prof["set-resources"][rule]
        assert res["gpu"] == 1 and res["gpu_model"], rule
        assert res["slurm_partition"] != cpu_partition, rule
    for rule in CPU_RULES:
        res = prof["set-resources"][rule]
        assert res.get("gpu", 0) == 0 and "gpu_model" not in res, rule
        assert res.get("slurm_partition", cpu_partition) == cpu_partition, rule
    assert prof["config"]["backend"] == "gpu"
    assert prof["config"]["capture"]["device"] == "cuda"


@pytest.mark.parametrize("name", ["slurm", "slurm-gpu"])
def test_cluster_profiles_cover_every_cluster_rule(name):
    rules, local = workflow_rules()
    if not rules:
        pytest.skip("no rules in workflow/rules yet")
    missing = sorted(rules - local - {"all"} - set(load(name)["set-resources"]))
    assert not missing, f"profiles/{name}: rules without set-resources (runtime): {missing}"


def _copy_workflow(dst: Path) -> None:
    shutil.copy2(ROOT / "Snakefile", dst / "Snakefile")
    for sub in ("config", "workflow", "profiles"):
        shutil.copytree(ROOT / sub, dst / sub, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.parametrize(
    "args", [["-n"], ["--profile", "profiles/default", "-n"]], ids=["auto", "explicit"]
)
def test_snakemake_picks_up_default_profile(args, tmp_path):
    _copy_workflow(tmp_path)
    target = "results/kv/smollm2-135m/ctx2048/manifest.json"
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args, target, "--quiet", "rules"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "workflow specific profile profiles/default" in proc.stderr


TOY = """\
rule all:
    input: "a.gpu", "b.gpu", "c.cpu"

rule gpu_job:
    output: "{x}.gpu"
    resources: gpu=1
    shell: "date +%s.%N > {output}; sleep 2; date +%s.%N >> {output}"

rule cpu_job:
    output: "{x}.cpu"
    shell: "date +%s.%N > {output}; sleep 2; date +%s.%N >> {output}"
"""


def _spans(wd: Path, names) -> list[tuple[float, float]]:
    return sorted(tuple(map(float, (wd / n).read_text().split())) for n in names)


@pytest.mark.parametrize("profile", ["default", "none"])
def test_local_gpu_guard(profile, tmp_path):
    """profiles/default keeps GPU jobs one at a time on a local run (with --cores 3 the two
    gpu=1 jobs would otherwise overlap); without it they do overlap (the control)."""
    (tmp_path / "Snakefile").write_text(TOY)
    shutil.copytree(PROFILES / "default", tmp_path / "profiles" / "default")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "3", "--workflow-profile", profile],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (s1, e1), (s2, e2) = _spans(tmp_path, ["a.gpu", "b.gpu"])
    overlapped = s2 < e1
    assert overlapped is (profile == "none"), (profile, (s1, e1), (s2, e2))
