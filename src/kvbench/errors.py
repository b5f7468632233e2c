"""One exception type for every user-facing failure, so the CLI and Snakemake show a clean message."""


class KvbenchError(RuntimeError):
    """A problem the user can fix (bad config, missing weights, corrupt shard, ...)."""
