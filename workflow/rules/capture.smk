# Capture the KV cache (+ a sample of post-RoPE queries) of one model at one context length.
# The shards L{layer}.{k,v,q}.npy sit next to the manifest, which is written last.


rule capture_kv:
    input:
        # ancient(): a re-run of fetch_model (same verified weights) must not recapture; a change of
        # the weights shows up in params.model_cfg (sha256 / packages / hf_id / revision).
        fetched=ancient("resources/models/{model}/.fetched.json"),
    output:
        manifest="results/kv/{model}/ctx{ctx}/manifest.json",
    params:
        model_cfg=model_cfg,
        model_dir=model_dir,
        capture=config["capture"],
        corpus=config["corpus"],
        seed=config["seed"],
    log:
        "logs/capture_kv/{model}/ctx{ctx}.log",
    benchmark:
        "benchmarks/capture/{model}/ctx{ctx}.tsv"
    threads: config["capture"]["threads"]
    resources:
        mem_mb=capture_mem_mb,
        gpu=1 if config["capture"]["device"] == "cuda" else 0,
    conda:
        "../../envs/gpu.yaml" if config["capture"]["device"] == "cuda" else "../../envs/cpu.yaml"
    script:
        "../scripts/capture_kv.py"
