# K-side variance_ratio x d_res ablation (spec kakeya.md §2.11) on the capture at ablation.ctx.
from kvbench.ablation import settings as ablation_settings

ABLATION = ablation_settings(config.get("ablation"))


rule ablation:
    input:
        manifest=f"results/kv/{{model}}/ctx{ABLATION['ctx']}/manifest.json",
    output:
        table="results/ablation/{model}.parquet",
    params:
        settings=ABLATION,
        backend=config["backend"],
    log:
        "logs/ablation/{model}.log",
    benchmark:
        "benchmarks/ablation/{model}.tsv"
    resources:
        mem_mb=2048 + ABLATION["ctx"] // 2,
    threads: 1
    conda:
        "../../envs/gpu.yaml" if config["backend"] == "gpu" else "../../envs/cpu.yaml"
    script:
        "../scripts/ablation.py"
