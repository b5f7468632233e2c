# Shared setup: config validation (before any job), wildcard constraints, helpers, all_targets().
import re
import sys
from pathlib import Path

from snakemake.utils import validate

try:
    import kvbench  # noqa: F401
except ImportError:  # not installed: use the repository's src/ (scripts still need `pip install -e .`)
    sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from kvbench.config import load_config, model_contexts
from kvbench.errors import KvbenchError

CONFIG_SCHEMA = Path(workflow.basedir) / "config" / "schema.yaml"

# ---- Validate the config: kvbench's own check names the offending key (and builds every codec),
# Snakemake's validate() is the standard mechanism (both fill schema defaults).
try:
    _validated = load_config(dict(config), CONFIG_SCHEMA)
except KvbenchError as _e:
    raise WorkflowError(str(_e)) from None
config.clear()
config.update(_validated)
validate(config, schema=str(CONFIG_SCHEMA), set_default=True)

MODELS = list(config["models"])
CODECS = list(config.get("codecs") or {})


def _alternatives(names):
    """A regex matching exactly one of ``names`` (never matches when empty)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


wildcard_constraints:
    model=_alternatives(MODELS),
    ctx=r"\d+",
    codec=_alternatives(CODECS),


# ---- Helpers


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def model_dir(wildcards):
    return f"resources/models/{wildcards.model}"


def contexts(model):
    return model_contexts(config, model)


def capture_mem_mb(wildcards, attempt):
    """Memory request of one capture job (MB): the model's ``mem_mb`` or a rough estimate.

    Estimate: 3 GB for weights + runtime, the fp32 attention scores of one prefill chunk (~32 heads),
    and the bf16 KV being written; doubled per retry.
    """
    m = config["models"][wildcards.model]
    if "mem_mb" in m:
        return m["mem_mb"] * attempt
    ctx = int(wildcards.ctx)
    chunk = m.get("prefill_chunk") or ctx
    est = 3000 + (32 * 4 * chunk * ctx) // 2**20 + ctx // 4
    return int(est) * attempt


def capture_targets():
    return [
        f"results/kv/{model}/ctx{ctx}/manifest.json" for model in MODELS for ctx in contexts(model)
    ]


def codec_targets():
    return [
        f"results/codec/{model}/ctx{ctx}/{codec}.parquet"
        for model in MODELS
        for ctx in contexts(model)
        for codec in CODECS
    ]


def all_targets():
    """The default target list: capture manifests + codec tables of every model x ctx x codec."""
    return capture_targets() + codec_targets()
