"""The conda environments (envs/*.yaml) cover what the code imports, and every rule uses one.

No conda needed: the env files are parsed as YAML and compared with the third-party imports
found by ``ast`` in src/kvbench and workflow/scripts (the code that runs inside the envs).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "envs"
RULES = ROOT / "workflow" / "rules"
SCRIPTS = ROOT / "workflow" / "scripts"

# import name -> env package names that provide it (conda-forge names, or pip names in the pip
# section). A new third-party import fails test_imports_are_mapped until it is added here AND to
# both env files.
IMPORT_TO_PACKAGES: dict[str, set[str]] = {
    "torch": {"pytorch", "pytorch-cpu", "pytorch-gpu", "torch"},
    "transformers": {"transformers"},
    "huggingface_hub": {"huggingface-hub"},
    "tokenizers": {"tokenizers"},
    "gguf": {"gguf"},
    "accelerate": {"accelerate"},
    "numpy": {"numpy"},
    "pyarrow": {"pyarrow"},
    "pandas": {"pandas"},
    "jinja2": {"jinja2"},
    "matplotlib": {"matplotlib", "matplotlib-base"},
    "yaml": {"pyyaml"},
    "jsonschema": {"jsonschema"},
    "filelock": {"filelock"},
    "snakemake": {"snakemake", "snakemake-minimal"},
    "cupy": {"cupy", "cupy-core"},
}
GPU_ONLY = {"cupy"}

# pyproject dependency (pip name) -> accepted env package names.
PIP_TO_ENV = {
    "torch": IMPORT_TO_PACKAGES["torch"],
    "matplotlib": IMPORT_TO_PACKAGES["matplotlib"],
    "snakemake": IMPORT_TO_PACKAGES["snakemake"],
    "cupy-cuda12x": IMPORT_TO_PACKAGES["cupy"],
}

_NAME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)")


def _pkg_name(spec: str) -> str:
    """'pytorch-cpu >=2.9' / 'gguf>=0.19' / 'conda-forge::numpy' -> 'pytorch-cpu' / 'gguf'."""
    spec = spec.split("::")[-1]
    m = _NAME.match(spec)
    assert m, f"cannot parse package spec {spec!r}"
    return m.group(1).lower().replace("_", "-")


def load_env(name: str) -> dict:
    return yaml.safe_load((ENVS / f"{name}.yaml").read_text())


def env_packages(env: dict) -> tuple[set[str], list[str]]:
    """(conda + pip package names, raw pip lines)."""
    names: set[str] = set()
    pip_lines: list[str] = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_lines = [str(x) for x in dep.get("pip", [])]
        else:
            names.add(_pkg_name(str(dep)))
    for line in pip_lines:
        if not line.startswith("-"):  # skip -e / -r / --option lines
            names.add(_pkg_name(line))
    return names, pip_lines


def third_party_imports() -> dict[str, list[str]]:
    """Top-level third-party module -> files importing it, for code that runs in the envs."""
    files = sorted((ROOT / "src" / "kvbench").rglob("*.py"))
    if SCRIPTS.is_dir():
        files += sorted(SCRIPTS.rglob("*.py"))
    local = {"kvbench", "__future__"} | {p.stem for p in SCRIPTS.glob("*.py")}
    found: dict[str, list[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


@pytest.fixture(scope="module")
def imports() -> dict[str, list[str]]:
    return third_party_imports()


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_env_file_shape(name):
    env = load_env(name)
    assert env["channels"][0] == "conda-forge", "conda-forge must be the first channel"
    names, pip_lines = env_packages(env)
    assert "python" in names
    if pip_lines:
        assert "pip" in names, "an env with a pip: section must list pip itself"


def test_imports_are_mapped(imports):
    unknown = {m: f for m, f in imports.items() if m not in IMPORT_TO_PACKAGES}
    assert not unknown, (
        f"third-party imports without an env mapping: {unknown}. Add the package to "
        "envs/cpu.yaml and envs/gpu.yaml and the mapping to IMPORT_TO_PACKAGES in this test."
    )


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_env_covers_imports(name, imports):
    names, _ = env_packages(load_env(name))
    # Every mapped module (what the code imports today is a subset: test_imports_are_mapped),
    # so the envs carry the whole pipeline's stack even before all modules exist.
    wanted = set(IMPORT_TO_PACKAGES) - (GPU_ONLY if name == "cpu" else set())
    missing = {
        mod: imports.get(mod, ["(not imported yet)"])
        for mod in sorted(wanted)
        if not (IMPORT_TO_PACKAGES[mod] & names)
    }
    assert not missing, f"envs/{name}.yaml lacks packages for imports: {missing}"


def test_cupy_only_in_gpu_env():
    cpu, _ = env_packages(load_env("cpu"))
    gpu, _ = env_packages(load_env("gpu"))
    assert not (IMPORT_TO_PACKAGES["cupy"] & cpu), "cupy belongs in envs/gpu.yaml only"
    assert IMPORT_TO_PACKAGES["cupy"] & gpu


def test_torch_variants():
    cpu, _ = env_packages(load_env("cpu"))
    gpu, _ = env_packages(load_env("gpu"))
    assert "pytorch-cpu" in cpu and not ({"pytorch-gpu", "cuda-version"} & cpu)
    assert "pytorch-gpu" in gpu and "cuda-version" in gpu


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_env_mirrors_pyproject(name):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names, _ = env_packages(load_env(name))
    missing = [d for d in deps if not (PIP_TO_ENV.get(_pkg_name(d), {_pkg_name(d)}) & names)]
    assert not missing, f"pyproject dependencies missing from envs/{name}.yaml: {missing}"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_editable_kvbench_path_resolves_to_repo(name):
    """Snakemake copies the env file to <conda-prefix>/<hash>.yaml (default .snakemake/conda/)
    and conda runs pip from that directory, so the editable path is relative to it."""
    _, pip_lines = env_packages(load_env(name))
    editable = [line.split(None, 1)[1] for line in pip_lines if line.startswith("-e ")]
    assert len(editable) == 1, f"envs/{name}.yaml must install kvbench once with -e"
    target = (ROOT / ".snakemake" / "conda" / editable[0]).resolve()
    assert target == ROOT, f"-e {editable[0]} resolves to {target}, not the repo root {ROOT}"
    project = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert project["name"] == "kvbench"


# ---- rules ---------------------------------------------------------------------------------
_RULE = re.compile(r"^(?:rule|checkpoint)\s+(\w+)\s*:", re.M)
_TOP = re.compile(r"^\S", re.M)  # next top-level statement ends a rule block
_CONDA = re.compile(r"^\s+conda\s*:\s*(.*(?:\n\s{8,}.*)*)", re.M)
_YAML_LIT = re.compile(r"[\"']([^\"']+\.ya?ml)[\"']")


def rule_blocks() -> dict[str, tuple[Path, str]]:
    blocks: dict[str, tuple[Path, str]] = {}
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        for m in _RULE.finditer(text):
            nxt = _TOP.search(text, m.end())
            blocks[m.group(1)] = (smk, text[m.end() : nxt.start() if nxt else len(text)])
    return blocks


def test_every_rule_has_a_conda_env():
    """Fails until the rules are wired (the lead adds the `conda:` lines)."""
    blocks = {n: b for n, b in rule_blocks().items() if n != "all"}
    if not blocks:
        pytest.skip("no rules in workflow/rules yet")
    without = sorted(
        f"{n} ({smk.relative_to(ROOT)})"
        for n, (smk, body) in blocks.items()
        if not _CONDA.search(body)
    )
    assert not without, f"rules without a conda: directive: {without}"
    for name, (smk, body) in blocks.items():
        value = _CONDA.search(body).group(1)
        paths = _YAML_LIT.findall(value)
        assert paths, f"rule {name}: conda: names no env file ({value.strip()!r})"
        for rel in paths:
            env = (smk.parent / rel).resolve()
            assert env.is_file(), f"rule {name}: conda env {rel} (from {smk.name}) not found"
            assert env.parent == ENVS, f"rule {name}: {rel} is not one of envs/*.yaml"
