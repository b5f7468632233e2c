"""Config schema: the shipped configs validate; bad ones fail with a message naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvbench.config import key_path, load_config, model_contexts
from kvbench.errors import KvbenchError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "config" / "config.yaml"
SEVEN = REPO / "config" / "seven_models.yaml"


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(DEFAULT.read_text())


def _error(cfg) -> str:
    with pytest.raises(KvbenchError) as ei:
        load_config(cfg)
    return str(ei.value)


def test_shipped_configs_validate_and_get_defaults():
    cfg = load_config(DEFAULT)
    assert set(cfg["models"]) == {"smollm2-135m", "gemma3-270m"}
    assert cfg["capture"]["threads"] >= 1 and cfg["capture"]["device"] == "cpu"
    seven = load_config(SEVEN)
    assert len(seven["models"]) == 7
    assert seven["contexts"] == [2048, 4096, 8192, 32768]
    assert {m["source"] for m in seven["models"].values()} == {"hf"}
    assert seven["capture"]["allow_download"] is False
    assert seven["models"]["smollm2_1_7b"]["prefill_chunk"] == 1024
    assert seven["models"]["glm_edge_4b"]["prefill_chunk"] == 1024
    assert seven["models"]["qwen3_0_6b"]["prefill_chunk"] == 0  # schema default
    assert seven["codecs"] == cfg["codecs"]


def test_defaults_are_filled_for_missing_sections(raw):
    for key in ("backend", "seed", "corpus", "capture"):
        raw.pop(key)
    cfg = load_config(raw)
    assert cfg["backend"] == "cpu" and cfg["seed"] == 0
    assert cfg["corpus"] == {"name": "pydoc_topics"}
    assert cfg["capture"]["query_positions"] == 128
    assert cfg["capture"]["allow_download"] is False


def test_input_dict_is_not_modified(raw):
    before = copy.deepcopy(raw)
    load_config(raw)
    assert raw == before


def test_typo_key_is_named_with_a_suggestion(raw):
    raw["contxts"] = raw.pop("contexts")
    msg = _error(raw)
    assert "config key 'contxts': unknown key (did you mean 'contexts'?)" in msg
    raw["contexts"] = raw.pop("contxts")
    raw["models"]["smollm2-135m"]["prefil_chunk"] = 1024
    msg = _error(raw)
    assert "config key 'models.smollm2-135m.prefil_chunk': unknown key" in msg
    assert "prefill_chunk" in msg


def test_wrong_type_is_named(raw):
    raw["capture"]["query_positions"] = "many"
    assert "config key 'capture.query_positions': 'many' is not of type 'integer'" in _error(raw)


def test_out_of_range_is_named(raw):
    raw["contexts"] = [2048, -5]
    assert "config key 'contexts[1]': -5 is less than the minimum of 256" in _error(raw)


def test_enum_and_pattern_values_are_named(raw):
    raw["backend"] = "tpu"
    raw["corpus"]["name"] = "wikipedia"
    msg = _error(raw)
    assert "config key 'backend'" in msg and "config key 'corpus.name'" in msg


def test_source_specific_keys_are_required(raw):
    del raw["models"]["smollm2-135m"]["sha256"]
    assert "config key 'models.smollm2-135m': 'sha256' is a required property" in _error(raw)


def test_model_names_must_be_path_safe(raw):
    raw["models"]["a/b"] = raw["models"].pop("smollm2-135m")
    assert "'a/b' is not allowed" in _error(raw)


def test_unknown_codec_family_is_named(raw):
    raw["codecs"]["mine"] = {"family": "zstd"}
    msg = _error(raw)
    assert "config key 'codecs.mine.family': 'zstd' is not one of" in msg


def test_bad_codec_parameter_is_named(raw):
    raw["codecs"]["mine"] = {"family": "identity", "bits": 3}
    msg = _error(raw)
    assert "config key 'codecs.mine'" in msg and "unknown parameter(s) ['bits']" in msg


def test_codec_entries_must_be_objects_with_family(raw):
    raw["codecs"]["x"] = "identity"
    assert "config key 'codecs.x'" in _error(raw)
    raw["codecs"]["x"] = {"bits": 2}
    assert "config key 'codecs.x': 'family' is a required property" in _error(raw)


def test_several_problems_are_reported_together(raw):
    raw["seed"] = -1
    raw["capture"]["allow_download"] = "yes"
    msg = _error(raw)
    assert "config key 'seed'" in msg and "config key 'capture.allow_download'" in msg
    assert "(2 problems)" in msg


def test_stage_sections_must_be_mappings(raw):
    for key in ("quality", "ablation", "report", "claims"):
        bad = copy.deepcopy(raw)
        bad[key] = 3
        assert f"config key '{key}': 3 is not of type 'object'" in _error(bad)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(KvbenchError, match=str(bad)):
        load_config(bad)
    with pytest.raises(KvbenchError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_model_contexts_override(raw):
    raw["models"]["gemma3-270m"]["contexts"] = [4096]
    cfg = load_config(raw)
    assert model_contexts(cfg, "gemma3-270m") == [4096]
    assert model_contexts(cfg, "smollm2-135m") == cfg["contexts"]


def test_key_path():
    assert key_path(["contexts", 1]) == "contexts[1]"
    assert key_path(["models", "a", "packages", 0]) == "models.a.packages[0]"
    assert key_path([]) == "<top level>"


@pytest.mark.workflow
def test_snakemake_stops_before_any_job_naming_the_key(raw, tmp_path):
    raw["capture"]["query_positions"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(bad),
         "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "wd")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config key 'capture.query_positions': 0 is less than the minimum of 1" in out
    assert "rule capture_kv" not in out
