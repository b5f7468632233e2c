# Fetch model weights into resources/models/{model}/ (checksum-verified; GGUF converted once to a
# bf16 safetensors cache). Runs on the submit host: compute nodes often have no internet.


localrules:
    fetch_model,


rule fetch_model:
    output:
        fetched="resources/models/{model}/.fetched.json",
    params:
        model_cfg=model_cfg,
        model_dir=model_dir,
        allow_download=config["capture"]["allow_download"],
    log:
        "logs/fetch_model/{model}.log",
    benchmark:
        "benchmarks/fetch_model/{model}.tsv"
    retries: 2
    resources:
        mem_mb=4000,
    threads: 1
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/fetch_model.py"
