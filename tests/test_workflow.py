"""The whole DAG on a small real config: a rerun does nothing, a codec edit reruns only its cells.

Runs Snakemake end to end on SmolLM2-135M (ctx 2048, three cheap codecs, quality on identity) in a
fresh work directory that reuses the fetched model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.model, pytest.mark.workflow]


def _small_config() -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["models"] = {"smollm2-135m": cfg["models"]["smollm2-135m"]}
    cfg["contexts"] = [2048]
    cfg["codecs"] = {
        "identity": {"family": "identity"},
        "q8_0": {"family": "ggml", "type": "q8_0"},
        "turbo3_llamacpp": {"family": "turboquant", "variant": "llamacpp", "bits": 3},
    }
    cfg["quality"].update(contexts=[2048], codecs=["identity"], n_tokens=32)
    cfg["ablation"]["enabled"] = False
    cfg["report"]["pairs"] = [["turbo3_llamacpp", "q8_0"]]
    return cfg


def _snakemake(workdir: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
        "--configfile", str(config), "--cores", "2", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ})


def _planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts from a dry run's 'Job stats' table."""
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    stats = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stats, re.M)}


def test_rerun_nothing_then_codec_edit_reruns_only_its_cells(smollm2_workdir):
    tmp_path = smollm2_workdir
    cfg = _small_config()
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(cfg))

    run = _snakemake(tmp_path, config, "all")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for out in ("results/SUMMARY.md", "results/DECISION.md", "results/metrics.parquet"):
        assert (tmp_path / out).is_file(), out

    assert _planned_jobs(_snakemake(tmp_path, config, "-n", "all")) == {}

    cfg["codecs"]["turbo3_llamacpp"]["bits"] = 2
    config.write_text(yaml.safe_dump(cfg))
    planned = _planned_jobs(_snakemake(tmp_path, config, "-n", "all"))
    assert planned.get("compress") == 1, planned
    assert "capture_kv" not in planned and "quality" not in planned, planned
    assert {"aggregate", "report"} <= set(planned), planned

    cell = "results/codec/smollm2-135m/ctx2048/turbo3_llamacpp.parquet"
    one = _planned_jobs(_snakemake(tmp_path, config, "-n", cell))
    assert one == {"compress": 1}, one
