# Quality beyond MSE: teacher-forced continuation (PPL, next-token KL, top-1 agreement) on a prefix
# cache replaced by the codec's decode, plus layer means of the attention metrics. One job per
# model x ctx x codec; the uncompressed reference runs in the same job through the same code path
# (the identity codec gives exactly 0). Targets: quality_targets() (in `rule all`, and read by
# report.smk). Logic: src/kvbench/quality.py.
from kvbench.codecs.base import codec_subconfig
from kvbench.quality import quality_targets as _quality_targets

try:
    _quality_targets(config)  # unknown codec names fail before any job
except KvbenchError as _e:
    raise WorkflowError(str(_e)) from None

quality_targets = lambda: _quality_targets(config)  # noqa: E731


rule quality:
    input:
        manifest="results/kv/{model}/ctx{ctx}/manifest.json",
        fetched="resources/models/{model}/.fetched.json",
    output:
        table="results/quality/{model}/ctx{ctx}/{codec}.parquet",
    params:
        capture_dir=lambda wc, input: str(Path(input.manifest).parent),
        model_cfg=model_cfg,
        model_dir=model_dir,
        # The resolved spec (split parts expanded) makes a parameter edit rerun only this codec.
        codecs=lambda wc: codec_subconfig(wc.codec, config["codecs"]),
        corpus=config["corpus"]["name"],
        n_tokens=config["quality"]["n_tokens"],
        attention=config["quality"]["attention"],
        backend=config["backend"],
        allow_download=config["capture"]["allow_download"],
    log:
        "logs/quality/{model}/ctx{ctx}/{codec}.log",
    benchmark:
        "benchmarks/quality/{model}/ctx{ctx}/{codec}.tsv"
    threads: config["quality"]["threads"]
    resources:
        mem_mb=capture_mem_mb,
        gpu=1 if config["backend"] == "gpu" else 0,
    conda:
        "../../envs/gpu.yaml" if config["backend"] == "gpu" else "../../envs/cpu.yaml"
    script:
        "../scripts/quality.py"
