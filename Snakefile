# kvbench: capture real KV caches once, compress them with every codec, measure, report.
# Logic lives in src/kvbench; rules stay declarative; scripts in workflow/scripts are adapters.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless the user names another config: `--configfile X` then replaces it
# instead of being merged into it (Snakemake's usual merge would mix both model grids).
if not config:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/capture.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/ablation.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/quality.smk"


rule all:
    input:
        all_targets(),
        quality_targets(),
        "results/SUMMARY.md",
        "results/DECISION.md",
    default_target: True
