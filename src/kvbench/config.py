"""Load and validate the workflow configuration (``config/schema.yaml``) with messages naming the
key.

``load_config`` is called at workflow start (workflow/rules/common.smk) so a typo'd key, a wrong
type, an out-of-range value or a bad codec parameter stops the run before any job starts.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from kvbench.errors import KvbenchError

#: The schema shipped with the repository (config/schema.yaml next to src/).
DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


def key_path(parts: Iterable[Any]) -> str:
    """``['contexts', 1]`` -> ``contexts[1]``; ``['models', 'a', 'gguf']`` -> ``models.a.gguf``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "<top level>"


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise KvbenchError(f"config file {path}: cannot read ({e.strerror})") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KvbenchError(f"config file {path}: not valid YAML ({e})") from e


def load_schema(schema_path: str | Path | None = None) -> dict[str, Any]:
    path = Path(schema_path) if schema_path is not None else DEFAULT_SCHEMA
    if not path.is_file():
        raise KvbenchError(f"config schema {path} not found (pass schema_path=)")
    schema = _read_yaml(path)
    if not isinstance(schema, dict):
        raise KvbenchError(f"config schema {path}: not a mapping")
    return schema


def _validator_with_defaults(schema: dict[str, Any]):
    """A validator for the schema's ``$schema`` draft that also fills ``default`` values into the
    instance, like Snakemake's ``validate(..., set_default=True)``."""
    from jsonschema import validators

    base = validators.validator_for(schema)
    props = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from props(validator, properties, instance, schema)

    cls = validators.extend(base, {"properties": set_defaults})
    base.check_schema(schema)
    return cls(schema)


def _describe(error, schema: dict[str, Any]) -> str:
    """One line for one jsonschema error, naming the key path."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        lines = []
        for key in unknown:
            hint = difflib.get_close_matches(key, allowed, n=1)
            hint_s = f" (did you mean {hint[0]!r}?)" if hint else ""
            lines.append(
                f"config key {key_path([*path, key])!r}: unknown key{hint_s}; "
                f"allowed here: {', '.join(allowed) or 'none'}"
            )
        return "\n".join(lines)
    if error.validator == "propertyNames" or "propertyNames" in error.schema_path:
        return (
            f"config key {key_path([*path, error.instance])!r}: "
            f"name {error.instance!r} is not allowed "
            f"(letters, digits, '.', '_', '-'; it becomes a file name and a wildcard value)"
        )
    if error.validator == "required":
        return f"config key {key_path(path)!r}: {error.message}"
    return f"config key {key_path(path)!r}: {error.message}"


def _check_codecs(cfg: dict[str, Any]) -> list[str]:
    """Build every configured codec so that unknown/out-of-range parameters fail now."""
    from kvbench.codecs.skip import build_codec_for_capture

    problems: list[str] = []
    codecs_cfg = cfg.get("codecs") or {}
    for name in codecs_cfg:
        try:
            # Layer count unknown until capture: any index is in range for a huge model.
            build_codec_for_capture(name, codecs_cfg, n_layers=1 << 20)
        except KvbenchError as e:
            problems.append(f"config key 'codecs.{name}': {e}")
    return problems


def validate_config(cfg: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Validate (and fill defaults into) a config dict in place; KvbenchError lists problems."""
    validator = _validator_with_defaults(schema)
    errors = sorted(
        validator.iter_errors(cfg), key=lambda e: (list(map(str, e.absolute_path)), e.validator)
    )
    problems = [_describe(e, schema) for e in errors]
    problems = [p for p in dict.fromkeys(problems) if p]
    if not problems:
        problems = _check_codecs(cfg)
    if problems:
        more = f"\n({len(problems)} problems)" if len(problems) > 1 else ""
        raise KvbenchError("invalid configuration:\n" + "\n".join(problems) + more)
    return cfg


def load_config(
    path_or_dict: str | Path | Mapping[str, Any], schema_path: str | Path | None = None
) -> dict[str, Any]:
    """Read (if a path) and validate a kvbench config; return a new dict with schema defaults
    filled.

    Raises KvbenchError whose message names each offending key path, e.g. ``config key
    'contexts[1]': -5 is less than the minimum of 256``.
    """
    if isinstance(path_or_dict, Mapping):
        cfg = copy.deepcopy(dict(path_or_dict))
        where = "config"
    else:
        where = str(path_or_dict)
        cfg = _read_yaml(Path(path_or_dict))
    if not isinstance(cfg, dict):
        raise KvbenchError(f"{where}: the configuration must be a mapping of keys, got {cfg!r}")
    return validate_config(cfg, load_schema(schema_path))


def model_contexts(cfg: dict[str, Any], model: str) -> list[int]:
    """The context lengths to capture for ``model`` (its own ``contexts`` or the global list)."""
    return list(cfg["models"][model].get("contexts") or cfg["contexts"])
