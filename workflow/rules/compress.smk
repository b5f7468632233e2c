# Compress one capture with one codec: exact bytes and reconstruction errors per layer-stream.
from kvbench.codecs.base import codec_subconfig


rule compress:
    input:
        manifest="results/kv/{model}/ctx{ctx}/manifest.json",
    output:
        table="results/codec/{model}/ctx{ctx}/{codec}.parquet",
        timing="results/timing/{model}/ctx{ctx}/{codec}.parquet",
    params:
        capture_dir=lambda wc, input: str(Path(input.manifest).parent),
        # The resolved spec (split parts expanded) makes a parameter edit rerun only this codec.
        codecs=lambda wc: codec_subconfig(wc.codec, config["codecs"]),
        backend=config["backend"],
    log:
        "logs/compress/{model}/ctx{ctx}/{codec}.log",
    benchmark:
        "benchmarks/compress/{model}/ctx{ctx}/{codec}.tsv"
    resources:
        mem_mb=lambda wc: 2048 + int(wc.ctx) // 4,
        # One card per GPU job; kvbench.backend's lock pool picks which card (backend: gpu|auto).
        gpu=1 if config["backend"] == "gpu" else 0,
    threads: 1
    conda:
        "../../envs/gpu.yaml" if config["backend"] == "gpu" else "../../envs/cpu.yaml"
    script:
        "../scripts/compress.py"
